"""``strategy="ddp"`` (each rank a separate process running the script): the existing
project with every callback, launched as a user would launch it — two devices on one
node, and one device on each of two nodes, whose processes a cluster starts one per node."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.fabric.plugins.environments.lightning import find_free_network_port

from lightning_landscape.report import read_scalars
from tests.examples_support import EXAMPLES

PROJECT = os.path.join(EXAMPLES, "existing_project")


def _fit(save_dir: Path, devices: int, num_nodes: int) -> tuple[Path, str]:
    """Run the project on ``devices x num_nodes`` ranks; return its log folder and rank 0's
    stdout.

    On one node Lightning starts the second rank itself; across nodes each node's process
    is started here with its ``NODE_RANK``, as ``torchrun`` or SLURM would. One thread per
    process, so both layouts compute bitwise alike.
    """
    command = [
        sys.executable,
        os.path.join(PROJECT, "main.py"),
        "fit",
        "--config",
        os.path.join(PROJECT, "landscape.yaml"),
        f"--trainer.devices={devices}",
        f"--trainer.num_nodes={num_nodes}",
        "--trainer.strategy=ddp",
        "--trainer.max_epochs=2",
        "--trainer.callbacks+=lightning_landscape.BatchSizeScheduler",
        "--trainer.callbacks.schedule={1: 64}",
        "--trainer.callbacks.lr_scaling=linear",
        "--trainer.callbacks+=lightning_landscape.Initializer",
        "--trainer.callbacks.rules={'net\\.\\d': kaiming_normal}",
    ]
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(find_free_network_port()),
    )
    nodes = [
        subprocess.Popen(
            [*command, f"--trainer.logger.init_args.save_dir={save_dir}"],
            env=dict(env, NODE_RANK=str(node)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=save_dir,
        )
        for node in range(num_nodes)
    ]
    outputs = [node.communicate(timeout=280) for node in nodes]
    # Both exit cleanly: before our callbacks destroyed the process group at exit, gloo
    # aborted one of them after a completed run in 3 runs of 15.
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    return save_dir, outputs[0][0]


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    return _fit(tmp_path_factory.mktemp("one_node"), devices=2, num_nodes=1)


@pytest.mark.timeout(600)
def test_existing_project_with_every_callback_under_ddp(one_node):
    log_dir, stdout = one_node
    logged = read_scalars(log_dir)
    # 1437 training digits: 719 per rank, 23 batches of 32 and then 12 of 64
    assert logged["landscape/batch_size/global"] == {0: 64.0, 23: 128.0}
    assert logged["landscape/batch_size/lr_scale"] == {0: 1.0, 23: 2.0}
    assert set(logged["landscape/hessian/lambda_max"]) == {0, 35}
    assert 0 in logged["landscape/signal/activation_std/net.0"]
    assert "Last landscape values" in stdout


@pytest.mark.timeout(600)
def test_two_nodes_log_what_two_devices_on_one_node_log(one_node, tmp_path):
    """Ranks are global, not per node: node 1's process (local rank 0) must take the
    second shard of the probe and data and write nothing, or the values would differ."""
    log_dir, stdout = _fit(tmp_path, devices=1, num_nodes=2)
    assert "Last landscape values" in stdout
    assert len(list(log_dir.rglob("events.out.tfevents.*"))) == 1
    logged, expected = read_scalars(log_dir), read_scalars(one_node[0])
    assert logged.keys() == expected.keys()
    for tag, values in expected.items():
        if not tag.endswith("seconds"):
            assert logged[tag] == pytest.approx(values, rel=1e-6), tag
