"""Overhead of each monitor at its default cadence, measured side by side in one process.

Trains a small CNN on scikit-learn's bundled digits for a fixed number of optimizer steps,
without and with each monitor (same seed, same data order), and prints the wall-time
overhead, the time the monitors report spending in their measurements (steadier than a
difference of two wall times on a shared machine) and the Hessian-vector products per
measurement (the first one starts cold).

Run: ``python benchmarks/monitor_overhead.py [--steps 1000] [--repeats 3] [--only NAME ...]``
"""

from __future__ import annotations

import argparse
import csv
import glob
import statistics
import tempfile
import time
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import (
    BatchSizeScheduler,
    GradientNoiseScaleMonitor,
    GradientNormMonitor,
    HessianEigenvalueMonitor,
    HessianSpectrumMonitor,
    Initializer,
    SharpnessMonitor,
)


class DigitsCNN(pl.LightningModule):
    def __init__(self, lr: float = 0.05, optimizer: str = "sgd") -> None:
        super().__init__()
        self.lr = lr
        self.optimizer = optimizer
        self.batch_size = 64
        self.net = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        if self.optimizer == "adam":  # the eigenvalue monitor then also measures λ_max(P⁻¹H)
            return torch.optim.Adam(self.parameters(), lr=self.lr / 50)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return loader(self.batch_size)


def loader(batch_size: int = 64) -> DataLoader:
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    return DataLoader(
        TensorDataset(x, torch.tensor(data.target)), batch_size=batch_size, shuffle=True
    )


MONITORS = {
    "none": list,
    "HessianEigenvalueMonitor": lambda: [HessianEigenvalueMonitor()],
    "HessianSpectrumMonitor": lambda: [HessianSpectrumMonitor()],
    "SharpnessMonitor": lambda: [SharpnessMonitor()],
    "GradientNormMonitor": lambda: [GradientNormMonitor()],
    "GradientNoiseScaleMonitor": lambda: [GradientNoiseScaleMonitor()],
    "Initializer": lambda: [
        Initializer({nn.Conv2d: "kaiming_normal", nn.Linear: "xavier_uniform"})
    ],
    "BatchSizeScheduler": lambda: [BatchSizeScheduler({0: 64})],
}


def run(
    name: str, steps: int, log_dir: str, accelerator: str, optimizer: str = "sgd"
) -> tuple[float, dict[str, torch.Tensor]]:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator=accelerator,
        max_steps=steps,
        logger=pl.loggers.CSVLogger(log_dir),
        callbacks=MONITORS[name](),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(DigitsCNN(optimizer=optimizer))
    return time.perf_counter() - start, trainer.logged_metrics


def logged_rows(log_dir: str) -> list[dict[str, float]]:
    """The CSVLogger's rows under ``log_dir``, in step order, without the empty cells."""
    rows = []
    for path in glob.glob(f"{log_dir}/**/metrics.csv", recursive=True):
        with open(path) as handle:
            rows += [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(handle)]
    return rows


def logged_values(rows: list[dict[str, float]], suffix: str) -> list[float]:
    """Every logged value whose name ends with ``suffix``, in step order."""
    return [v for row in rows for k, v in row.items() if k.endswith(suffix)]


def describe_hvps(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.0f}"
    later = statistics.mean(values[1:])
    return f"{statistics.mean(values):.1f} ({values[0]:.0f} first, {later:.1f} later)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--only", nargs="+", choices=list(MONITORS), help="a subset to time")
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    args = parser.parse_args()
    chosen = ["none", *(n for n in args.only or MONITORS if n != "none")]
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    print(
        f"torch {torch.__version__}, 1 thread, {args.steps} steps of a digits CNN, median of {args.repeats}\n"
    )
    times: dict[str, list[float]] = {name: [] for name in chosen}
    measuring: dict[str, list[float]] = {name: [] for name in chosen}
    hvps: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as log_dir:  # the first timed run would pay CUDA's start
        run("none", 20, log_dir, args.accelerator, args.optimizer)
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit every variant alike
        for name in chosen:
            with tempfile.TemporaryDirectory() as log_dir:
                seconds, _ = run(name, args.steps, log_dir, args.accelerator, args.optimizer)
                rows = logged_rows(log_dir)
            times[name].append(seconds)
            measuring[name].append(sum(logged_values(rows, "/seconds")))
            hvps[name] = logged_values(rows, "/n_hvp")
    base = statistics.median(times["none"])
    # The monitors log the seconds each measurement took: their sum over the unmonitored
    # run's time is the overhead without the run-to-run noise of two wall times.
    print(
        "| monitor | default cadence | time (s) | overhead | time measuring / unmonitored run "
        "| HVPs / measurement: mean (first, later) |"
    )
    print("|---|---|---:|---:|---:|---:|")
    cadence = {
        "none": "",
        "HessianEigenvalueMonitor": "every 300 steps",
        "HessianSpectrumMonitor": "every epoch",
        "SharpnessMonitor": "every 300 steps",
        "GradientNormMonitor": "every 50 steps (log_every_n_steps)",
        "GradientNoiseScaleMonitor": "every 50 steps",
        "Initializer": "once, at setup (with the signal report)",
        "BatchSizeScheduler": "constant schedule (loader never rebuilt)",
    }
    for name in chosen:
        median = statistics.median(times[name])
        overhead = "" if name == "none" else f"{100 * (median / base - 1):+.1f} %"
        spent = statistics.median(measuring[name])
        share = f"{100 * spent / base:.1f} %" if spent else ""
        print(
            f"| {name} | {cadence[name]} | {median:.2f} | {overhead} | {share} "
            f"| {describe_hvps(hvps[name])} |"
        )


if __name__ == "__main__":
    main()
