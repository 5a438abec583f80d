"""Two processes over gloo, each holding a shard, match one process holding the union."""

import gc
import os
import subprocess
import sys
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from lightning.fabric.plugins.environments.lightning import find_free_network_port

from lightning_landscape.curvature import (
    HessianOperator,
    hessian_eigenvalues,
    hessian_trace,
    spectral_density,
)
from lightning_landscape.gradients import gradient_noise_scale
from tests.support import cross_entropy, make_batch, make_model

WORLD_SIZE = 2


def _measure(batches, dtype=torch.float64):
    model = make_model("tanh_mlp", dtype=dtype)
    vector = torch.randn(83, generator=torch.Generator().manual_seed(3), dtype=dtype)
    op = HessianOperator(model, cross_entropy, batches)
    return {
        "hvp": op.matvec(vector),
        "loss": op.loss,
        "gradient": op.gradient,
        "eigenvalues": hessian_eigenvalues(
            model, cross_entropy, batches, k=2, which="both", tol=1e-10
        ).eigenvalues,
        "trace": torch.tensor(hessian_trace(model, cross_entropy, batches, max_iter=40).trace),
        "negative_mass": torch.tensor(
            spectral_density(model, cross_entropy, batches, n_steps=20).negative_mass
        ),
    }


def _shards(rank):
    """Rank 0: half the data in one batch; rank 1: the other half in two uneven batches."""
    x, y = make_batch("tanh_mlp", n=32)
    if rank == 0:
        return (x[:16], y[:16])
    return [(x[16:21], y[16:21]), (x[21:], y[21:])]


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    torch.set_num_threads(1)
    try:
        results = _measure(_shards(rank))
        x, y = make_batch("tanh_mlp", n=32, dtype=torch.float32)
        half = slice(16 * rank, 16 * (rank + 1))
        model32 = make_model("tanh_mlp", dtype=torch.float32)
        results["hvp32"] = HessianOperator(model32, cross_entropy, (x[half], y[half])).matvec(
            torch.ones(83)
        )
        x64, y64 = make_batch("tanh_mlp", n=32)
        noise = gradient_noise_scale(
            make_model("tanh_mlp"), cross_entropy, (x64[half], y64[half]), micro_batches=4
        )
        results["noise"] = torch.tensor(
            [noise.grad_sq, noise.trace_cov, noise.small_batch, noise.big_batch]
        )
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _failing_worker(rank, port, out_dir):
    """Rank 1's loss raises: both ranks must raise, and the next collectives still pair up."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    torch.set_num_threads(1)

    outputs = []

    def loss_fn(model, batch):
        outputs.append(weakref.ref(output := model(batch[0])))
        if rank == 1:
            raise ValueError("rank 1 cannot evaluate its batch")
        return F.cross_entropy(output, batch[1])

    def outcome(measure):
        try:
            measure()
        except Exception as err:  # noqa: BLE001  (what each rank raised is the result)
            return f"{type(err).__name__}: {err}"
        return "no error"

    model, batch = make_model("tanh_mlp"), make_batch("tanh_mlp", n=16)
    gc.disable()  # what the failed pass held must go with the error, not at a collection
    try:
        results = {
            "product": outcome(
                lambda: HessianOperator(model, loss_fn, batch).matvec(torch.ones(83))
            ),
            "held": [ref() is not None for ref in outputs],
            "noise": outcome(lambda: gradient_noise_scale(model, loss_fn, batch)),
            "after": HessianOperator(model, cross_entropy, batch).matvec(torch.ones(83)),
        }
        torch.save(results, os.path.join(out_dir, f"failing{rank}.pt"))
    finally:
        gc.enable()
        dist.destroy_process_group()


def test_an_error_on_one_rank_raises_on_every_rank(tmp_path):
    mp.spawn(_failing_worker, args=(find_free_network_port(), str(tmp_path)), nprocs=WORLD_SIZE)
    first, second = (torch.load(tmp_path / f"failing{r}.pt") for r in range(WORLD_SIZE))
    for key in ("product", "noise"):
        assert second[key] == "ValueError: rank 1 cannot evaluate its batch"
        assert first[key] == f"PeerFailureError: rank 1 failed: {second[key]}"
    assert first["held"] == second["held"] == [False]  # the memory it ran out of, say
    torch.testing.assert_close(first["after"], second["after"], rtol=0, atol=0)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("ddp"))
    mp.spawn(_worker, args=(find_free_network_port(), out_dir), nprocs=WORLD_SIZE, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD_SIZE)]


def test_every_rank_holds_the_same_result(ranks):
    for key, value in ranks[0].items():
        torch.testing.assert_close(ranks[1][key], value, rtol=0, atol=0, msg=key)


def test_shards_match_one_process_on_the_union(ranks):
    single = _measure(make_batch("tanh_mlp", n=32))
    for key, value in single.items():
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-5, atol=1e-12, msg=key)


def test_float32_product_matches_the_union(ranks):
    x, y = make_batch("tanh_mlp", n=32, dtype=torch.float32)
    single = HessianOperator(
        make_model("tanh_mlp", dtype=torch.float32), cross_entropy, (x, y)
    ).matvec(torch.ones(83))
    torch.testing.assert_close(ranks[0]["hvp32"], single, rtol=1e-5, atol=1e-6)


def test_noise_scale_of_the_shards_is_that_of_the_union(ranks):
    """Each rank splits its half into 4 micro-batches: one process splitting the whole into 8."""
    single = gradient_noise_scale(
        make_model("tanh_mlp"), cross_entropy, make_batch("tanh_mlp", n=32), micro_batches=8
    )
    expected = torch.tensor(
        [single.grad_sq, single.trace_cov, single.small_batch, single.big_batch]
    )
    torch.testing.assert_close(ranks[0]["noise"], expected, rtol=1e-6, atol=0)


_EXITING_SCRIPT = """
import atexit
import torch.distributed as dist
from lightning_landscape._distributed import end_process_group_at_exit

dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
atexit.register(lambda: print("initialised at exit:", dist.is_initialized()))
end_process_group_at_exit()
end_process_group_at_exit()  # every callback of ours asks; one handler serves
"""


def test_the_process_group_is_destroyed_before_the_interpreter_finalises():
    """Left to finalisation, a gloo worker thread freeing a tensor aborts the process
    (pytorch/pytorch#190489). Exit handlers run last registered first: the line printed
    comes after ours."""
    script = _EXITING_SCRIPT.format(port=find_free_network_port())
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "initialised at exit: False\n"
