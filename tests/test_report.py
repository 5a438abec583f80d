"""The report command renders a run's logs, and says clearly when a folder holds none."""

import subprocess
import sys

import lightning.pytorch as pl
import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

from lightning_landscape import HessianEigenvalueMonitor, LossLandscapeMonitor
from lightning_landscape.__main__ import main
from lightning_landscape.report import PANELS, Run, _decode, _draw_panel, read_runs
from tests.examples_support import run_example
from tests.lightning_support import DigitsModel, trainer


def test_the_demo_and_a_report_of_its_logs(tmp_path, capsys):
    final = run_example("demo", tmp_path, "--smoke", "true")
    assert final["hessian/lambda_max"] >= final["hessian/lambda_min"]
    assert (tmp_path / "summary.png").stat().st_size > 10_000  # the demo's own picture
    (run,) = read_runs(tmp_path)
    assert run.name == "run/version_0" and "landscape/slices/surface" in run.images

    page = tmp_path / "page.html"
    assert (
        main(["report", str(tmp_path), "--out", str(tmp_path / "r.png"), "--html", str(page)]) == 0
    )
    height, width, _ = imread(tmp_path / "r.png").shape
    assert height > 500 and width > 500
    assert "landscape/hessian/lambda_max" in page.read_text()
    assert "wrote" in capsys.readouterr().out


def test_a_csv_logger_run_is_read_as_its_tensorboard_twin(tmp_path):
    """Its metrics.csv, and the figures written as PNG files for want of an image logger."""
    loggers = {
        "tb": pl.loggers.TensorBoardLogger(tmp_path / "tb"),
        "csv": pl.loggers.CSVLogger(tmp_path / "csv"),
    }
    for name, logger in loggers.items():
        pl.seed_everything(0)
        monitors = [
            HessianEigenvalueMonitor(every_n_steps=2),
            LossLandscapeMonitor(line_points=5, resolution=3),
        ]
        trainer(tmp_path / name, monitors, max_steps=4, logger=logger).fit(DigitsModel())
    (events,) = read_runs(tmp_path / "tb")
    (table,) = read_runs(tmp_path / "csv")
    logged = [
        tag
        for tag in events.scalars
        if tag.startswith("landscape/") and not tag.endswith("/seconds")  # a clock's
    ]
    assert "landscape/hessian/lambda_max" in logged
    for tag in logged:  # TensorBoard keeps float32
        assert table.scalars[tag] == pytest.approx(events.scalars[tag], rel=1e-6)
    assert (
        set(table.images)
        == set(events.images)
        == {
            "landscape/slices/line",
            "landscape/slices/surface",
        }
    )
    for tag, png in events.images.items():
        np.testing.assert_array_equal(_decode(table.images[tag]), _decode(png))
    assert main(["report", str(tmp_path / "csv")]) == 0


def test_a_folder_without_landscape_data_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "metrics.csv").write_text("name,value\naccuracy,0.9\n")  # no logger's
    assert main(["report", str(tmp_path)]) == 2
    assert "no landscape data below" in capsys.readouterr().err
    done = subprocess.run(
        [sys.executable, "-m", "lightning_landscape", "report", str(tmp_path / "missing")],
        check=False,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and f"no such log directory: {tmp_path / 'missing'}" in done.stderr


def test_named_monitors_get_their_own_curves():
    run = Run(
        "run",
        scalars={
            "landscape/hessian/lambda_max": {0: 1.0},
            "landscape/hessian/conv/lambda_max": {0: 2.0},
            "landscape/hessian/conv/stability_threshold": {0: 3.0},
            "landscape/hessian/conv/extra/lambda_max": {0: 4.0},  # two levels: not a name
        },
    )
    title, tags = PANELS[1]
    axes = Figure().add_subplot()
    _draw_panel(axes, title, tags, [run])
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert set(lines) == {
        "run: hessian/lambda_max",
        "run: hessian/conv/lambda_max",
        "run: hessian/conv/stability_threshold",
    }
    assert lines["run: hessian/conv/stability_threshold"].get_linestyle() == "--"
