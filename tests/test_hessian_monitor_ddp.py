"""HessianEigenvalueMonitor under DDP: two CPU processes over gloo."""

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lightning_landscape import HessianEigenvalueMonitor
from lightning_landscape.callbacks._loss import training_step_loss
from lightning_landscape.curvature import hessian_eigenvalues
from tests.lightning_support import DigitsModel, digits, read_scalars, trainer


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


def test_ddp_logs_the_values_of_one_process_on_the_union(tmp_path):
    pl.seed_everything(0)
    model = DigitsModel(arch="mlp")
    reference = hessian_eigenvalues(
        model, training_step_loss, _union_probe(), k=1, which="both", tol=1e-8, max_iter=300
    )
    monitor = HessianEigenvalueMonitor(
        every_n_steps=2, measure_at_start=True, tol=1e-8, max_iter=300
    )
    trainer(tmp_path, [monitor], max_steps=2, devices=2, strategy="ddp_spawn").fit(model)
    logged = read_scalars(tmp_path)
    scale = abs(reference.eigenvalues[0].item())
    assert (
        abs(logged["landscape/hessian/lambda_max"][0] - reference.eigenvalues[0].item())
        <= 1e-5 * scale
    )
    assert (
        abs(logged["landscape/hessian/lambda_min"][0] - reference.eigenvalues[-1].item())
        <= 1e-5 * scale
    )
    assert sorted(logged["landscape/hessian/lambda_max"]) == [0, 2]


def nan_on_rank_one(module, batch):
    loss = F.cross_entropy(module(batch[0]), batch[1])
    return loss * float("nan") if dist.get_rank() == 1 else loss


def test_nan_on_one_rank_skips_everywhere_without_hanging(tmp_path):
    monitor = HessianEigenvalueMonitor(every_n_steps=2, loss_fn=nan_on_rank_one)
    trainer(
        tmp_path, [monitor], max_steps=4, devices=2, strategy="ddp_spawn", log_every_n_steps=1
    ).fit(DigitsModel(arch="mlp"))
    logged = read_scalars(tmp_path)
    assert max(logged["train_loss"]) == 3  # every step ran (steps 0..3)
    assert not any(tag.startswith("landscape/hessian/lambda") for tag in logged)
