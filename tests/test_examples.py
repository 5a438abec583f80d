"""Every example runs briefly in CI and prints a verdict read from its own logs; the claims
themselves are checked on the default settings in the slow tests."""

import os

import pytest

from lightning_landscape.report import read_scalars
from tests.examples_support import EXAMPLES, import_example, run_example


def _only_run(out, name):
    (version,) = os.listdir(out / name)
    return out / name / version


def test_saddle_escape_smoke(tmp_path, capsys):
    verdict = run_example("saddle_escape", tmp_path, "--smoke", "true")
    logged = read_scalars(_only_run(tmp_path, "sgd"))
    assert verdict["sgd"]["λ_min at start"] == logged["landscape/hessian/lambda_min"][0] < 0
    assert verdict["gd_full_batch"]["grad norm at start"] < 1e-5  # it starts at the saddle
    assert "Saddle escape" in capsys.readouterr().out
    assert (tmp_path / "summary.png").exists()


def test_edge_of_stability_smoke(tmp_path):
    verdict = run_example(
        "edge_of_stability", tmp_path, "--smoke", "true", "--lrs", "[0.4]", "--adam_lrs", "[0.002]"
    )
    logged = read_scalars(_only_run(tmp_path, "gd_lr_0.4"))["landscape/hessian/lambda_max"]
    assert verdict["gd η=0.4"]["at start"] == logged[0] and verdict["gd η=0.4"]["threshold"] == 5.0
    adam = read_scalars(_only_run(tmp_path, "adam_lr_0.002"))
    assert verdict["adam η=0.002"]["threshold"] == pytest.approx(38 / 0.002)
    assert (
        verdict["adam η=0.002"]["at start"]
        == adam["landscape/hessian/preconditioned_lambda_max"][5]
    )


def test_batch_size_sharpness_smoke(tmp_path):
    verdict = run_example("batch_size_sharpness", tmp_path, "--smoke", "true")
    assert list(verdict) == ["small", "large_same_lr", "large_scaled_lr"]
    assert verdict["large_scaled_lr"]["η"] == 0.4  # the linear rule, capped
    logged = read_scalars(_only_run(tmp_path, "small"))
    assert verdict["small"]["λ_max"] == logged["landscape/hessian/lambda_max"][10]


def test_initialization_smoke(tmp_path):
    verdict = run_example(
        "initialization", tmp_path, "--smoke", "true", "--schemes", "[kaiming, zeros]"
    )
    assert verdict["kaiming"]["flagged at init"] == "-"
    assert "symmetric" in verdict["zeros"]["flagged at init"]
    with pytest.raises(SystemExit):
        run_example("initialization", tmp_path, "--schemes", "[glorot]")


def test_batch_size_schedule_smoke(tmp_path):
    verdict = run_example("batch_size_schedule", tmp_path, "--smoke", "true")
    assert verdict["constant"]["final batch"] == 16
    logged = read_scalars(_only_run(tmp_path, "geometric"))["landscape/batch_size/per_device"]
    assert verdict["geometric"]["final batch"] == logged[max(logged)] > 16


def test_existing_project_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(EXAMPLES, "existing_project"))
    from main import main

    final = main(
        [
            "fit",
            "--config",
            os.path.join(EXAMPLES, "existing_project", "landscape.yaml"),
            "--trainer.max_steps=6",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    logged = read_scalars(tmp_path)
    for tag in ("hessian/lambda_max", "spectrum/trace", "sharpness/sam", "slices/center_loss"):
        assert final[f"landscape/{tag}"] == pytest.approx(logged[f"landscape/{tag}"][6])


@pytest.mark.slow
def test_sgd_escapes_the_saddle_before_gradient_descent(tmp_path):
    verdict = run_example("saddle_escape", tmp_path)
    gd, sgd = verdict["gd_full_batch"]["steps to escape"], verdict["sgd"]["steps to escape"]
    assert sgd is not None and (gd is None or sgd < gd)


@pytest.mark.slow
def test_the_large_batch_is_sharper_at_the_same_learning_rate(tmp_path):
    verdict = run_example("batch_size_sharpness", tmp_path)
    assert verdict["large_same_lr"]["λ_max"] > verdict["small"]["λ_max"]


@pytest.mark.slow
def test_sharpness_hovers_at_the_stability_threshold_for_gd_and_adam(tmp_path):
    verdict = run_example("edge_of_stability", tmp_path)
    assert len(verdict) == 3  # two GD rates (2/η) and Adam (38/η, preconditioned)
    for row in verdict.values():
        assert row["at start"] < 0.8 * row["threshold"]  # it did sharpen
        assert abs(row["ratio to threshold"] - 1) < 0.2


def test_the_download_option_fails_with_a_clear_message_offline(tmp_path, monkeypatch):
    common = import_example("common")
    monkeypatch.setattr("socket.socket.connect", _refuse)  # no network, whatever the machine
    with pytest.raises(RuntimeError, match="CIFAR-10"):
        common.ImageDataModule(dataset="cifar10", data_dir=str(tmp_path)).setup()


def _refuse(*args, **kwargs):
    raise OSError("network disabled in this test")
