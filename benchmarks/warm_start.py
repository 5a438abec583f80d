"""What the warm start of ``HessianEigenvalueMonitor`` saves, and what bounds the saving.

Trains the digits CNN of ``monitor_overhead.py`` with the monitor at its default settings
but for the cadence, twice: warm-started, and cold (``warm_start=False``). Observing does
not change the run, so both pass through the same weights; those are kept at every
measurement and a tight Lanczos run (tol 1e-8) on the monitor's probe gives the reference.
Per cadence it prints the products per measurement warm and cold side by side, those
of a third, warm-started run that wants λ_max alone (``which="largest"``: what that end
costs by itself, which a run wanting both ends must also reach), the mean and largest
λ_min error relative to λ_max (fewer products at a larger error would be no saving), the
saddle labels that disagree with the reference, and the overlap |<u_prev, u>| of
consecutive reference eigenvectors: how much of the last measurement's eigenvectors is
left to start from.

Run: ``python benchmarks/warm_start.py [--steps 1500] [--cadences 50 150 300]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import warnings
from itertools import pairwise

import lightning.pytorch as pl
import torch
from monitor_overhead import DigitsCNN

from lightning_landscape import HessianEigenvalueMonitor
from lightning_landscape.callbacks._loss import training_step_loss
from lightning_landscape.curvature import EigenResult, hessian_eigenvalues
from lightning_landscape.report import Scalars, read_scalars

_HESSIAN = "landscape/hessian"


class _KeepWeights(pl.Callback):
    """The module's weights at every ``every`` optimizer steps (after the monitor ran)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_) -> None:
        if trainer.global_step % self.every == 0:
            self.weights[trainer.global_step] = copy.deepcopy(pl_module.state_dict())


def monitored_run(
    cadence: int, steps: int, warm_start: bool, optimizer: str, which: str = "both"
) -> tuple[Scalars, HessianEigenvalueMonitor, _KeepWeights]:
    pl.seed_everything(0, verbose=False)
    monitor = HessianEigenvalueMonitor(
        which=which,
        every_n_steps=cadence,
        measure_at_end=False,
        warm_start=warm_start,
        preconditioned=False,
    )
    weights = _KeepWeights(cadence)
    with tempfile.TemporaryDirectory() as log_dir:
        pl.Trainer(
            max_steps=steps,
            logger=pl.loggers.TensorBoardLogger(log_dir),
            callbacks=[monitor, weights],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(DigitsCNN(optimizer=optimizer))
        scalars = read_scalars(log_dir)
    return scalars, monitor, weights


def reference(state: dict[str, torch.Tensor], probe: list, optimizer: str) -> EigenResult:
    model = DigitsCNN(optimizer=optimizer)
    model.load_state_dict(state)
    return hessian_eigenvalues(
        model, training_step_loss, probe, k=1, which="both", tol=1e-8, max_iter=400
    )


def compare(cadence: int, steps: int, optimizer: str) -> str:
    warm, monitor, weights = monitored_run(cadence, steps, True, optimizer)
    cold, _, _ = monitored_run(cadence, steps, False, optimizer)
    top_alone, _, _ = monitored_run(cadence, steps, True, optimizer, which="largest")
    refs = {
        step: reference(weights.weights[step], monitor._probe_data, optimizer)
        for step in warm[f"{_HESSIAN}/n_hvp"]
    }
    error = {"warm": [], "cold": []}
    wrong = {"warm": 0, "cold": 0}
    for step, ref in refs.items():
        lambda_max, lambda_min = ref.eigenvalues.tolist()
        saddle = lambda_min < -monitor.saddle_tol * lambda_max
        for name, logged in (("warm", warm), ("cold", cold)):
            error[name].append(
                abs(logged[f"{_HESSIAN}/lambda_min"][step] - lambda_min) / lambda_max
            )
            wrong[name] += bool(logged[f"{_HESSIAN}/saddle"][step]) != saddle
    vectors = [refs[step].eigenvectors for step in sorted(refs)]
    overlaps = torch.stack([(a * b).sum(1).abs() for a, b in pairwise(vectors)])
    top, bottom = overlaps.median(0).values.tolist()
    hvps = {
        name: statistics.mean(logged[f"{_HESSIAN}/n_hvp"].values())
        for name, logged in (("warm", warm), ("cold", cold), ("top alone", top_alone))
    }
    return (
        f"| {cadence} | {len(refs)} | {hvps['warm']:.1f} | {hvps['cold']:.1f} "
        f"| {hvps['warm'] / hvps['cold']:.2f} | {hvps['top alone']:.1f} | {top:.2f} / {bottom:.2f} "
        f"| {statistics.mean(error['warm']):.1e} / {statistics.mean(error['cold']):.1e} "
        f"| {max(error['warm']):.1e} / {max(error['cold']):.1e} "
        f"| {wrong['warm']} / {wrong['cold']} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--cadences", type=int, nargs="+", default=[50, 150, 300])
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {args.steps} steps of a digits CNN ({args.optimizer})\n")
    print(
        "| every n steps | measurements | HVPs / measurement, warm-started run (its first "
        "cold) | HVPs / measurement, cold run | warm / cold "
        "| HVPs / measurement, warm-started run for λ_max alone "
        "| eigenvector overlap with the last measurement, λ_max / λ_min (median) "
        "| mean abs. λ_min error / λ_max, warm / cold "
        "| max abs. λ_min error / λ_max, warm / cold | wrong saddle labels, warm / cold |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for cadence in args.cadences:
        print(compare(cadence, args.steps, args.optimizer), flush=True)


if __name__ == "__main__":
    main()
