"""``strategy="ddp"`` (each rank a separate process running the script): the existing
project with every callback, launched as a user would launch it."""

import os
import subprocess
import sys

import pytest

from lightning_landscape.report import read_scalars
from tests.examples_support import EXAMPLES

PROJECT = os.path.join(EXAMPLES, "existing_project")


@pytest.mark.timeout(600)
def test_existing_project_with_every_callback_under_ddp(tmp_path):
    command = [
        sys.executable,
        os.path.join(PROJECT, "main.py"),
        "fit",
        "--config",
        os.path.join(PROJECT, "landscape.yaml"),
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_epochs=2",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.callbacks+=lightning_landscape.BatchSizeScheduler",
        "--trainer.callbacks.schedule={1: 64}",
        "--trainer.callbacks.lr_scaling=linear",
        "--trainer.callbacks+=lightning_landscape.Initializer",
        "--trainer.callbacks.rules={'net\\.\\d': kaiming_normal}",
    ]
    for _attempt in range(3):  # gloo may abort a worker at interpreter exit (see fit_ddp_spawn)
        done = subprocess.run(
            command, capture_output=True, text=True, check=False, cwd=tmp_path, timeout=280
        )
        if done.returncode == 0 or "terminate called" not in done.stderr:
            break
    assert done.returncode == 0, done.stderr[-3000:]
    logged = read_scalars(tmp_path)
    # 1437 training digits: 719 per rank, 23 batches of 32 and then 12 of 64
    assert logged["landscape/batch_size/global"] == {0: 64.0, 23: 128.0}
    assert logged["landscape/batch_size/lr_scale"] == {0: 1.0, 23: 2.0}
    assert set(logged["landscape/hessian/lambda_max"]) == {0, 35}
    assert 0 in logged["landscape/signal/activation_std/net.0"]
    assert "Last landscape values" in done.stdout
