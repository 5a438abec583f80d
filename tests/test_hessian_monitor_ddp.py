"""The monitors under DDP: two CPU processes over gloo."""

import os
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from lightning_landscape import (
    GradientNoiseScaleMonitor,
    HessianEigenvalueMonitor,
    LossLandscapeMonitor,
)
from lightning_landscape.callbacks._loss import training_step_loss
from lightning_landscape.curvature import hessian_eigenvalues
from tests.lightning_support import (
    CustomBatches,
    DigitsModel,
    FourierDigits,
    NaNPastTheHead,
    digits,
    fit_ddp_spawn,
    graphs_count,
    read_scalars,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A collective called on one rank only hangs the other: fail fast instead.
pytestmark = pytest.mark.timeout(240)


def _union_probe(world_size=2, batch_size=32, seed=0):
    """What rank r draws, for r = 0..world_size-1, concatenated (see ``probe_indices``)."""
    dataset = digits()
    rows = []
    for rank in range(world_size):
        shard = torch.arange(rank, len(dataset), world_size)
        rows.append(
            shard[torch.randperm(len(shard), generator=torch.Generator().manual_seed(seed))][
                :batch_size
            ]
        )
    x, y = dataset[torch.cat(rows)]
    return x, y


def _fit_logging_the_union_s_eigenvalues(tmp_path, model, loss_fn, max_steps, **monitor_args):
    """Fit on two ranks, check that the λ_max and λ_min logged first are those of one
    process on the union of the ranks' probes, and return the logged scalars."""
    reference = hessian_eigenvalues(
        model, loss_fn, _union_probe(), k=1, which="both", tol=1e-8, max_iter=300
    )
    monitor = HessianEigenvalueMonitor(
        measure_at_start=True, tol=1e-8, max_iter=300, **monitor_args
    )
    logged = read_scalars(fit_ddp_spawn(tmp_path, [monitor], model, max_steps=max_steps))
    lambda_max, lambda_min = reference.eigenvalues.tolist()
    assert logged["landscape/hessian/lambda_max"][0] == pytest.approx(lambda_max, rel=1e-5)
    assert logged["landscape/hessian/lambda_min"][0] == pytest.approx(
        lambda_min, abs=1e-5 * abs(lambda_max)
    )
    return logged


def test_ddp_logs_the_values_of_one_process_on_the_union(tmp_path):
    pl.seed_everything(0)
    logged = _fit_logging_the_union_s_eigenvalues(
        tmp_path, DigitsModel(arch="mlp"), training_step_loss, max_steps=2, every_n_steps=2
    )
    assert sorted(logged["landscape/hessian/lambda_max"]) == [0, 2]


def test_ddp_logs_a_complex_model_s_values_of_one_process_on_the_union(tmp_path):
    """Complex weights measured over their real coordinates, products all-reduced as such;
    under Adam, whose preconditioned sharpness is logged too."""
    pl.seed_everything(0)
    logged = _fit_logging_the_union_s_eigenvalues(
        tmp_path, FourierDigits(), training_step_loss, max_steps=2, every_n_steps=2
    )
    assert 2 in logged["landscape/hessian/preconditioned_lambda_max"]


def _contrast(z, everyone, rank):
    """InfoNCE of each sample of ``rank`` against every rank's: its own row is the positive."""
    targets = torch.arange(len(z)) + rank * len(z)
    return F.cross_entropy(z @ everyone.T / 0.5, targets)


class _GatheredContrast(DigitsModel):
    """A SimCLR/CLIP-style loss: each rank contrasts its samples with every rank's,
    gathered with gradients, so a rank's loss depends on the other rank's batch."""

    def __init__(self) -> None:
        super().__init__(arch="mlp")

    def training_step(self, batch, batch_idx):
        x, y = batch
        z = self(x)
        everyone = self.all_gather(z, sync_grads=True).flatten(0, 1)
        loss = F.cross_entropy(z, y) + 0.1 * _contrast(z, everyone, self.global_rank)
        self.log("train_loss", loss)
        return loss


def _union_contrast(model, batch, world_size=2):
    """The mean of the ranks' losses, all computed in one process."""
    x, y = batch
    everyone = model(x)
    losses = [
        F.cross_entropy(z, t) + 0.1 * _contrast(z, everyone, rank)
        for rank, (z, t) in enumerate(zip(everyone.chunk(world_size), y.chunk(world_size)))
    ]
    return torch.stack(losses).mean()


def test_a_loss_gathered_across_ranks_is_measured_as_the_union_s(tmp_path):
    # The products run the collectives of the gather's double backward in lockstep.
    pl.seed_everything(0)
    _fit_logging_the_union_s_eigenvalues(
        tmp_path, _GatheredContrast(), _union_contrast, max_steps=1, every_n_steps=None
    )


class _FrozenSyncBatchNorm(DigitsModel):
    """The digits CNN with a SyncBatchNorm that trains frozen (in eval mode: its own forward
    refuses CPU tensors in training mode), and no dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.net[5] = torch.nn.Identity()
        self.net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.net)

    def setup(self, stage):
        # DDP refuses SyncBatchNorm in CPU modules, whose own forward is CUDA-only; this
        # spawned rank lets it through, as DDP does on GPUs (the parent process is untouched).
        DistributedDataParallel._passing_sync_batchnorm_handle = lambda ddp, module: None

    def on_train_batch_start(self, batch, batch_idx):
        self.net[2].eval()


def test_sync_batch_norm_in_train_mode_normalises_the_union_of_the_probes(tmp_path):
    pl.seed_everything(0)
    _fit_logging_the_union_s_eigenvalues(
        tmp_path, _FrozenSyncBatchNorm(), training_step_loss, max_steps=1, mode="train"
    )


def nan_on_rank_one(module, batch):
    loss = F.cross_entropy(module(batch[0]), batch[1])
    return loss * float("nan") if dist.get_rank() == 1 else loss


def test_nan_on_one_rank_skips_everywhere_without_hanging(tmp_path):
    monitor = HessianEigenvalueMonitor(every_n_steps=2, loss_fn=nan_on_rank_one)
    log_dir = fit_ddp_spawn(
        tmp_path, [monitor], DigitsModel(arch="mlp"), max_steps=4, log_every_n_steps=1
    )
    logged = read_scalars(log_dir)
    assert max(logged["train_loss"]) == 3  # every step ran (steps 0..3)
    assert not any(tag.startswith("landscape/hessian/lambda") for tag in logged)


def raise_on_rank_one(module, batch):
    if dist.get_rank() == 1:
        raise ValueError("rank 1 cannot measure this batch")
    return F.cross_entropy(module(batch[0]), batch[1])


@pytest.mark.parametrize(
    "monitor",  # the three ways ranks sum: operator products, noise-scale sums, landscape grids
    [
        HessianEigenvalueMonitor(every_n_steps=2, loss_fn=raise_on_rank_one),
        GradientNoiseScaleMonitor(every_n_steps=2, loss_fn=raise_on_rank_one),
        LossLandscapeMonitor(
            every_n_steps=2, line_points=3, resolution=3, loss_fn=raise_on_rank_one
        ),
    ],
    ids=type,
)
def test_an_error_on_one_rank_skips_everywhere_without_hanging(tmp_path, monitor):
    log_dir = fit_ddp_spawn(
        tmp_path, [monitor], DigitsModel(arch="mlp"), max_steps=4, log_every_n_steps=1
    )
    logged = read_scalars(log_dir)
    assert max(logged["train_loss"]) == 3  # every step ran (steps 0..3)
    assert not [tag for tag in logged if tag.startswith("landscape/")]


class _WritesItsBatchOnRankOne(DigitsModel):
    """From the second step on, rank 1's training_step scales its batch in place."""

    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and self.global_step > 0:
            batch[0] /= 2.0
        return super().training_step(batch, batch_idx)


def test_a_batch_written_on_one_rank_only_skips_everywhere_without_hanging(tmp_path):
    # Rank 1 has no copy of its step-2 batch as drawn (its first step did not write), so
    # that point is skipped on both ranks; from then on rank 1 copies its batches.
    monitor = GradientNoiseScaleMonitor(every_n_steps=2)
    log_dir = fit_ddp_spawn(tmp_path, [monitor], _WritesItsBatchOnRankOne(arch="mlp"), max_steps=4)
    assert sorted(read_scalars(log_dir)["landscape/noise_scale/grad_sq"]) == [4]


def test_a_custom_batch_type_is_weighted_across_ranks_by_batch_size_fn(tmp_path):
    # ranks weigh their shares by sample count, which a custom batch type cannot tell
    monitor = HessianEigenvalueMonitor(every_n_steps=2, batch_size_fn=graphs_count)
    log_dir = fit_ddp_spawn(tmp_path, [monitor], CustomBatches(arch="mlp"), max_steps=2)
    assert sorted(read_scalars(log_dir)["landscape/hessian/lambda_max"]) == [2]


def test_noise_scale_under_ddp_is_that_of_the_union(tmp_path):
    from lightning_landscape.gradients import gradient_noise_scale

    pl.seed_everything(0)
    model = DigitsModel(arch="mlp")
    expected = gradient_noise_scale(model, training_step_loss, _union_probe(), micro_batches=8)
    monitor = GradientNoiseScaleMonitor(probe="fixed", measure_at_start=True, every_n_steps=None)
    logged = read_scalars(fit_ddp_spawn(tmp_path, [monitor], model, max_steps=1))
    assert logged["landscape/noise_scale/trace_cov"][0] == pytest.approx(
        expected.trace_cov, rel=1e-5
    )
    assert logged["landscape/noise_scale/grad_sq"][0] == pytest.approx(expected.grad_sq, rel=1e-4)


def test_landscape_under_ddp_is_that_of_the_union(tmp_path):
    import copy
    import glob

    from lightning_landscape.curvature import HessianOperator
    from lightning_landscape.landscape import filter_normalized_direction, loss_surface

    pl.seed_everything(0)
    model = DigitsModel(arch="mlp")
    initial = copy.deepcopy(model)
    monitor = LossLandscapeMonitor(
        resolution=3, line_points=0, measure_at_start=True, measure_at_end=False
    )
    log_dir = fit_ddp_spawn(tmp_path, [monitor], model, max_steps=1)
    (raw_path,) = glob.glob(f"{log_dir}/**/landscape/slices_step0.pt", recursive=True)
    surface = torch.load(raw_path)["surface"]

    operator = HessianOperator(initial, training_step_loss, _union_probe())
    x = filter_normalized_direction(operator, 0)
    y = filter_normalized_direction(operator, 1)
    steps = torch.linspace(-1, 1, 3, dtype=torch.float64)
    torch.testing.assert_close(
        surface, loss_surface(operator, x, y, steps, steps), rtol=1e-5, atol=1e-6
    )


def test_a_resumed_run_keeps_each_rank_s_probe(tmp_path):
    # Only rank 0 writes the checkpoint: it must hold rank 1's probe too.
    pl.seed_everything(0)
    model = DigitsModel(arch="mlp")
    first = fit_ddp_spawn(
        tmp_path / "first",
        [HessianEigenvalueMonitor(every_n_steps=2)],
        model,
        max_steps=2,
        enable_checkpointing=True,
    )
    (checkpoint,) = first.glob("**/*.ckpt")
    monitor = HessianEigenvalueMonitor(every_n_steps=None, tol=1e-8, max_iter=300)
    resumed = fit_ddp_spawn(
        tmp_path / "resumed", [monitor], model, max_steps=4, ckpt_path=checkpoint
    )
    # ddp_spawn hands the final weights back: measure them on the union of the two shards
    reference = hessian_eigenvalues(
        model, training_step_loss, _union_probe(), k=1, which="both", tol=1e-8, max_iter=300
    )
    logged = read_scalars(resumed)["landscape/hessian/lambda_max"]
    assert logged[4] == pytest.approx(reference.eigenvalues[0].item(), rel=1e-5)


def _two_monitors():
    return [
        HessianEigenvalueMonitor(every_n_steps=2, measure_at_start=True),
        GradientNoiseScaleMonitor(every_n_steps=2),
    ]


_FORKED_FIT = """
import sys
import lightning.pytorch as pl
from tests.lightning_support import DigitsModel, trainer
from tests.test_hessian_monitor_ddp import _two_monitors

pl.seed_everything(0)
fit = trainer(sys.argv[1], _two_monitors(), devices=2, strategy="ddp_fork", max_steps=4)
fit.fit(DigitsModel(arch="mlp"))
"""


def test_forked_ranks_as_in_a_notebook_log_what_spawned_ranks_log(tmp_path):
    """``ddp_notebook`` is ``ddp_fork``: ranks forked from a running interpreter, holding
    copies of the monitors' state, not fresh unpickled ones. It runs in a fresh
    interpreter, as a notebook kernel would be (pytest's own has run much else)."""
    forked = tmp_path / "forked"
    done = subprocess.run(
        [sys.executable, "-c", _FORKED_FIT, str(forked)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        timeout=200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    pl.seed_everything(0)
    spawned = read_scalars(
        fit_ddp_spawn(tmp_path / "spawned", _two_monitors(), DigitsModel(arch="mlp"), max_steps=4)
    )
    logged = read_scalars(forked)
    assert set(logged) == set(spawned)
    assert set(logged["landscape/hessian/lambda_max"]) == {0, 2, 4}
    for tag, values in spawned.items():
        if not tag.endswith("seconds"):
            assert logged[tag] == values, tag


class _HeadOfTwoShards(NaNPastTheHead):
    head = 128  # two batches of 32 on each of two ranks, whose shards interleave


def test_each_rank_of_an_overfitting_run_probes_the_head_of_its_shard(tmp_path):
    monitor = HessianEigenvalueMonitor(every_n_steps=2, measure_at_start=True)
    model = _HeadOfTwoShards(arch="mlp")
    log_dir = fit_ddp_spawn(tmp_path, [monitor], model, max_steps=4, overfit_batches=2)
    logged = read_scalars(log_dir)["landscape/hessian/lambda_max"]
    assert set(logged) == {0, 2, 4}  # a NaN sample in either probe would skip the point
