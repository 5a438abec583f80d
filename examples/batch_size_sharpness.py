"""Large batches reach sharper minima than small ones at the same learning rate.

Keskar et al. (2017) found that large-batch training lands in sharper minima that
generalise worse; later work (Goyal et al. 2017; Jastrzebski et al. 2018) traced the
sharpness to the ratio learning rate / batch size: more noise per step, flatter
minimum. Three runs of the same MLP (MSE loss, digits) with the same step budget:

- ``small``: batch 16 at learning rate η;
- ``large_same_lr``: the whole train set per step (gradient descent) at the same η;
- ``large_scaled_lr``: the whole train set at η scaled by the linear rule
  (η·B_large/B_small), capped at ``--max_lr``, the largest rate that still trains (the
  uncapped rate diverges: linear scaling stops working beyond a critical batch size).

The table reports the final λ_max (with 2/η, the largest sharpness gradient descent can
keep), the worst-case ε-sharpness, train and test accuracy. The λ_max ordering is the
claim reproduced here (larger at the same η; the scaled rate settles near 2/η, at the
edge of stability). The other columns are printed as measured: on digits the test
accuracies stay within about a percent, and ε-sharpness, relative to 1 + loss, need not
order the runs the same way.

    python examples/batch_size_sharpness.py          # about a minute on a laptop CPU
"""

from __future__ import annotations

import os
import sys

import lightning as L

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

from lightning_landscape import HessianEigenvalueMonitor, SharpnessMonitor


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = common.parser(__doc__, out="lightning_logs/batch_size_sharpness")
    parser.set_defaults({"data.one_hot": True})
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate of the small batch")
    parser.add_argument("--small_batch", type=int, default=16, help="the small batch size")
    parser.add_argument("--max_lr", type=float, default=0.4, help="cap of the scaled rate")
    parser.add_argument("--steps", type=int, default=1800, help="optimizer steps of each run")
    config = parser.parse_args(argv)
    steps = 10 if config.smoke else config.steps
    train_size = (
        int(1797 * (1 - config.data["test_fraction"]))
        if config.data["dataset"] == "digits"
        else 50000
    )
    scaled = min(config.lr * train_size / config.small_batch, config.max_lr)
    runs = {
        "small": (config.small_batch, config.lr),
        "large_same_lr": (0, config.lr),
        "large_scaled_lr": (0, scaled),
    }
    runner = common.Runner(parser, config)
    for name, (batch_size, lr) in runs.items():
        L.seed_everything(config.seed)
        data = common.ImageDataModule(**{**config.data, "batch_size": batch_size})
        model = common.Classifier(data.input_dim, (64, 64), "tanh", "mse", lr)
        callbacks = [
            HessianEigenvalueMonitor(every_n_steps=max(steps // 6, 1), measure_at_start=True),
            SharpnessMonitor(
                measures=("sam", "worst_case"), every_n_steps=None, measure_at_end=True
            ),
        ]
        runner.fit(name, model, data, callbacks, steps=steps)
    if not runner.is_main:
        return {}
    verdict = {}
    for name, log_dir in runner.log_dirs.items():
        scalars = common.read_scalars(log_dir)
        batch_size, lr = runs[name]
        verdict[name] = {
            "batch": batch_size or "full",
            "η": lr,
            "2/η": 2 / lr,
            "λ_max": common.last(scalars, "landscape/hessian/lambda_max"),
            "worst-case sharpness": common.last(scalars, "landscape/sharpness/worst_case"),
            "train loss": common.last(scalars, "final/train_loss"),
            "train acc": common.last(scalars, "final/train_acc"),
            "test acc": common.last(scalars, "final/test_acc"),
        }
    runner.conclude(f"Batch size and sharpness after {steps} steps", "run", verdict)
    return verdict


if __name__ == "__main__":
    main()
