"""The monitors are configurable from LightningCLI: flags, YAML, help text, validation."""

import pytest
from lightning.pytorch.cli import LightningCLI

from lightning_landscape import BatchSizeScheduler, HessianEigenvalueMonitor, Initializer
from lightning_landscape.batch_size import Milestones, Ramp
from tests.lightning_support import DigitsModel

pytest.importorskip("jsonargparse")


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["cli"])


def _cli(tmp_path, *args):
    return LightningCLI(
        DigitsModel,
        run=False,
        save_config_callback=None,
        args=[f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu", *args],
    )


def _monitor(cli):
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, HessianEigenvalueMonitor)]
    return monitor


def test_flags(tmp_path):
    cli = _cli(
        tmp_path,
        "--trainer.callbacks+=lightning_landscape.HessianEigenvalueMonitor",
        "--trainer.callbacks.k=3",
        "--trainer.callbacks.every_n_steps=5",
        "--trainer.callbacks.probe=current",
    )
    monitor = _monitor(cli)
    assert (monitor.k, monitor.every_n_steps, monitor.probe) == (3, 5, "current")


def test_two_named_monitors_from_flags(tmp_path):
    cli = _cli(
        tmp_path,
        "--trainer.callbacks+=lightning_landscape.HessianEigenvalueMonitor",
        "--trainer.callbacks.params=[^net\\.1\\.]",
        "--trainer.callbacks.name=conv",
        "--trainer.callbacks+=lightning_landscape.HessianEigenvalueMonitor",
        "--trainer.callbacks.params=[^net\\.6\\.]",
        "--trainer.callbacks.name=head",
    )
    monitors = [c for c in cli.trainer.callbacks if isinstance(c, HessianEigenvalueMonitor)]
    assert [(m.name, m.params) for m in monitors] == [
        ("conv", [r"^net\.1\."]),
        ("head", [r"^net\.6\."]),
    ]


def test_yaml(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning_landscape.HessianEigenvalueMonitor\n"
        "      init_args:\n"
        "        which: largest\n"
        "        params: ['^net\\.2\\.']\n"
        "        every_n_steps: null\n"
        "        every_n_epochs: 2\n"
    )
    monitor = _monitor(_cli(tmp_path, f"--config={config}"))
    assert (
        monitor.which == "largest"
        and monitor.params == [r"^net\.2\."]
        and monitor.every_n_epochs == 2
    )


def test_invalid_values_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _cli(
            tmp_path,
            "--trainer.callbacks+=lightning_landscape.HessianEigenvalueMonitor",
            "--trainer.callbacks.which=top",
        )
    assert "which" in capsys.readouterr().err


def test_help_comes_from_the_docstring(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _cli(tmp_path, "--trainer.callbacks.help=lightning_landscape.HessianEigenvalueMonitor")
    out = capsys.readouterr().out
    assert "number of largest eigenvalues" in out and "--trainer.callbacks.saddle_tol" in out


def test_sharpness_measures_from_the_command_line(tmp_path):
    from lightning_landscape import SharpnessMonitor

    cli = _cli(
        tmp_path,
        "--trainer.callbacks+=lightning_landscape.SharpnessMonitor",
        "--trainer.callbacks.measures=[sam, worst_case]",
        "--trainer.callbacks.epsilon=0.01",
    )
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, SharpnessMonitor)]
    assert monitor.measures == ["sam", "worst_case"] and monitor.epsilon == 0.01


def test_yaml_configures_the_batch_size_scheduler_and_the_initializer(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning_landscape.BatchSizeScheduler\n"
        "      init_args:\n"
        "        schedule:\n"
        "          class_path: lightning_landscape.batch_size.Ramp\n"
        "          init_args: {end_size: 256, end_epoch: 4}\n"
        "        lr_scaling: sqrt\n"
        "    - class_path: lightning_landscape.Initializer\n"
        "      init_args:\n"
        "        rules: {'net\\.\\d': kaiming_normal, torch.nn.Linear: zeros}\n"
    )
    callbacks = _cli(tmp_path, f"--config={config}").trainer.callbacks
    (ramp,) = [c for c in callbacks if isinstance(c, BatchSizeScheduler)]
    assert isinstance(ramp.schedule, Ramp) and ramp.schedule.end_size == 256
    assert ramp.lr_scaling == "sqrt"
    (initializer,) = [c for c in callbacks if isinstance(c, Initializer)]
    assert initializer.rules == {r"net\.\d": "kaiming_normal", "torch.nn.Linear": "zeros"}

    flags = _cli(
        tmp_path,
        "--trainer.callbacks+=lightning_landscape.BatchSizeScheduler",
        "--trainer.callbacks.schedule={2: 64, 4: 128}",
    )
    (milestones,) = [c for c in flags.trainer.callbacks if isinstance(c, BatchSizeScheduler)]
    assert isinstance(milestones.schedule, Milestones)
    assert milestones.schedule.milestones == {2: 64, 4: 128}
