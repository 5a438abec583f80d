"""Two processes over gloo, each holding a shard, match one process holding the union."""

import contextlib
import functools
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
from torch import nn

from lightning_landscape.curvature import (
    HessianOperator,
    hessian_eigenvalues,
    hessian_trace,
    spectral_density,
)
from lightning_landscape.gradients import gradient_noise_scale
from tests.support import cross_entropy, dense_hessian, make_batch, make_model

WORLD_SIZE = 2


def _margin_loss(model, batch):
    """A loss whose kernel has no double backward: each rank builds its graph again
    through the composite."""
    return F.multi_margin_loss(model(batch[0]), batch[1])


def _measure(batches, dtype=torch.float64):
    model = make_model("tanh_mlp", dtype=dtype)
    vector = torch.randn(83, generator=torch.Generator().manual_seed(3), dtype=dtype)
    op = HessianOperator(model, cross_entropy, batches)
    margin = HessianOperator(make_model("tanh_mlp", dtype=dtype), _margin_loss, batches)
    return {
        "hvp": op.matvec(vector),
        "margin_hvp": margin.matvec(vector),
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


@contextlib.contextmanager
def _process_group(rank, port):
    """Join the two-process gloo group of a spawned worker, and leave it on the way out."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _worker(rank, port, out_dir):
    with _process_group(rank, port):
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


def _outcome(measure):
    try:
        measure()
    except Exception as err:  # noqa: BLE001  (what each rank raised is the result)
        return f"{type(err).__name__}: {err}"
    return "no error"


def _failing_worker(rank, port, out_dir):
    """Rank 1's loss raises: both ranks must raise, and the next collectives still pair up."""
    outputs = []

    def loss_fn(model, batch):
        outputs.append(weakref.ref(output := model(batch[0])))
        if rank == 1:
            raise ValueError("rank 1 cannot evaluate its batch")
        return F.cross_entropy(output, batch[1])

    model, batch = make_model("tanh_mlp"), make_batch("tanh_mlp", n=16)
    gc.disable()  # what the failed pass held must go with the error, not at a collection
    with _process_group(rank, port):
        results = {
            "product": _outcome(
                lambda: HessianOperator(model, loss_fn, batch).matvec(torch.ones(83))
            ),
            "held": [ref() is not None for ref in outputs],
            "noise": _outcome(lambda: gradient_noise_scale(model, loss_fn, batch)),
            "after": HessianOperator(model, cross_entropy, batch).matvec(torch.ones(83)),
        }
        torch.save(results, os.path.join(out_dir, f"failing{rank}.pt"))
    gc.enable()


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


def _sync_bn_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    return nn.SyncBatchNorm.convert_sync_batchnorm(model).double()


# Two union batches of 16, split unevenly: rank 0 holds 6 and 4 samples, rank 1 10 and 12.
_SYNC_SPLITS = ((slice(0, 6), slice(16, 20)), (slice(6, 16), slice(20, 32)))


def _sync_bn_worker(rank, port, out_dir, device="cpu"):
    with _process_group(rank, port):
        x, y = make_batch("tanh_mlp", n=32)
        shards = [(x[s], y[s]) for s in _SYNC_SPLITS[rank]]
        model = _sync_bn_model().to(device)
        op = HessianOperator(model, cross_entropy, shards)
        ones = torch.ones(op.size, dtype=op.dtype)
        results = {
            "hessian": torch.stack([op.matvec(e) for e in torch.eye(op.size, dtype=op.dtype)]),
            "gradient": op.gradient,
            "own_forward": any("forward" in vars(m) for m in model.modules()),
            # A measurement of this rank's batches alone (slices, noise scale) syncs nothing.
            "local": HessianOperator(model, cross_entropy, shards, distributed=False).matvec(ones),
            "eval": HessianOperator(model, cross_entropy, shards, mode="eval").gradient,
        }
        results["uneven"] = _outcome(
            lambda: HessianOperator(model, cross_entropy, shards[: rank + 1])
        )
        for where in ("before", "after"):  # rank 1 fails before or after the layer's sums
            failing = HessianOperator(model, _failing_on_rank_one(rank, where), shards)
            results[f"failure {where}"] = _outcome(functools.partial(failing.matvec, ones))
        results["next"] = op.matvec(ones)  # the sums pair up
        results["cdist"] = _cdist_products(rank, device)
        torch.save(results, os.path.join(out_dir, f"sync{rank}_{device}.pt"))


# Rank 1's first batch holds 30 samples, so torch.cdist takes its matrix-multiply path
# there, which differentiates twice; rank 0's batches run the direct kernel, which does not.
_CDIST_SPLITS = ((slice(0, 6), slice(36, 40)), (slice(6, 36), slice(40, 64)))


def _anchored(model, batch):
    """Cross-entropy plus the mean distance of the logits to three fixed anchors."""
    logits = model(batch[0])
    anchors = torch.linspace(-1, 1, 9, dtype=logits.dtype, device=logits.device).reshape(3, 3)
    return F.cross_entropy(logits, batch[1]) + torch.cdist(logits, anchors).mean()


def _cdist_products(rank, device):
    x, y = make_batch("tanh_mlp", n=64)
    shards = [(x[s], y[s]) for s in _CDIST_SPLITS[rank]]
    op = HessianOperator(_sync_bn_model().to(device), _anchored, shards)
    return torch.stack([op.matvec(v) for v in _cdist_vectors(op.size)])


def _cdist_vectors(size):
    return torch.randn(3, size, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def _failing_on_rank_one(rank, where):
    def loss_fn(model, batch):
        if rank == 1 and where == "before":
            raise ValueError("rank 1 fails before")
        loss = cross_entropy(model, batch)
        if rank == 1 and where == "after":
            raise ValueError("rank 1 fails after")
        return loss

    return loss_fn


@pytest.fixture(scope="module")
def sync_bn_ranks(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("sync_bn"))
    mp.spawn(_sync_bn_worker, args=(find_free_network_port(), out_dir), nprocs=WORLD_SIZE)
    return [torch.load(os.path.join(out_dir, f"sync{r}_cpu.pt")) for r in range(WORLD_SIZE)]


def test_sync_batch_norm_hessian_is_that_of_one_process_normalising_the_union(sync_bn_ranks):
    """SyncBatchNorm's own autograd function has no double backward (and refuses CPU input)."""
    x, y = make_batch("tanh_mlp", n=32)
    union = [(x[:16], y[:16]), (x[16:], y[16:])]

    def mean_loss(forward, batches):
        return sum(F.cross_entropy(forward(xs), ys) for xs, ys in batches) / len(batches)

    expected = dense_hessian(_sync_bn_model().train(), mean_loss, union)
    single = HessianOperator(_sync_bn_model(), cross_entropy, union)
    for rank in sync_bn_ranks:
        torch.testing.assert_close(rank["hessian"], expected, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(rank["gradient"], single.gradient, rtol=1e-9, atol=1e-12)
        assert not rank["own_forward"]  # the layers' forward is theirs again


def test_sync_batch_norm_off_the_sum_and_in_eval_mode_uses_no_peer_statistics(sync_bn_ranks):
    x, y = make_batch("tanh_mlp", n=32)
    for splits, rank in zip(_SYNC_SPLITS, sync_bn_ranks):
        shards = [(x[s], y[s]) for s in splits]
        local = HessianOperator(_sync_bn_model(), cross_entropy, shards)
        torch.testing.assert_close(rank["local"], local.matvec(torch.ones(local.size)))
    whole = HessianOperator(_sync_bn_model(), cross_entropy, (x, y), mode="eval")
    torch.testing.assert_close(sync_bn_ranks[0]["eval"], whole.gradient, rtol=1e-9, atol=1e-12)


def test_sync_batch_norm_refuses_ranks_holding_different_numbers_of_batches(sync_bn_ranks):
    for rank in sync_bn_ranks:
        assert rank["uneven"].startswith("ValueError: every process must hold the same number")


def test_a_failure_on_one_rank_around_sync_batch_norm_raises_on_every_rank(sync_bn_ranks):
    """Rank 0 waits in the layer's sums while rank 1 reports its failure: they pair up."""
    first, second = sync_bn_ranks
    for where in ("before", "after"):
        assert second[f"failure {where}"] == f"ValueError: rank 1 fails {where}"
        assert (
            first[f"failure {where}"]
            == f"PeerFailureError: rank 1 failed: {second[f'failure {where}']}"
        )
    torch.testing.assert_close(first["next"], second["next"], rtol=0, atol=0)


def test_ranks_agree_on_composites_when_a_kernel_runs_on_one_of_them(sync_bn_ranks):
    """A pass that only rank 0 must build again through the composites is built again on
    both: rank 1 alone going on to differentiate would pair its backward's sums with rank
    0's second forward pass."""
    x, y = make_batch("tanh_mlp", n=64)
    union = HessianOperator(_sync_bn_model(), _anchored, [(x[:36], y[:36]), (x[36:], y[36:])])
    expected = torch.stack([union.matvec(v) for v in _cdist_vectors(union.size)])
    for rank in sync_bn_ranks:
        torch.testing.assert_close(rank["cdist"], expected, rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sync_batch_norm_on_cuda_measures_what_it_measures_on_the_cpu(sync_bn_ranks, tmp_path):
    """Both ranks share the one GPU over gloo (benchmarks/gpu_check.sh runs this)."""
    args = (find_free_network_port(), str(tmp_path), "cuda")
    mp.spawn(_sync_bn_worker, args=args, nprocs=WORLD_SIZE)
    for r, on_cpu in enumerate(sync_bn_ranks):
        on_cuda = torch.load(tmp_path / f"sync{r}_cuda.pt", map_location="cpu")
        for key in ("hessian", "gradient", "local", "next", "cdist"):
            torch.testing.assert_close(on_cuda[key], on_cpu[key], rtol=1e-9, atol=1e-12, msg=key)
        for key in ("uneven", "failure before", "failure after"):
            assert on_cuda[key] == on_cpu[key]
