"""Full-batch training sharpens until it reaches the optimiser's stability threshold.

Cohen et al. (2021): with full-batch GD at learning rate η, the Hessian's top eigenvalue
rises during training ("progressive sharpening") until it reaches the stability
threshold 2/η, and then stays near it while the loss keeps falling, non-monotonically
("edge of stability"). The MSE loss shows it early; with cross-entropy sharpness falls
late in training. Cohen et al. (2022): full-batch Adam does the same with the
*preconditioned* sharpness λ_max(P⁻¹H), which settles at (2 + 2β₁)/((1 − β₁)η) = 38/η.
One run per learning rate on 1000 digits; the summary picture draws each sharpness
next to its run's dashed threshold.

    python examples/edge_of_stability.py                 # about a minute on a laptop CPU
    python examples/edge_of_stability.py --lrs '[0.1, 0.2, 0.4]' --steps 5000
"""

from __future__ import annotations

import os
import sys

import lightning as L

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

from lightning_landscape import HessianEigenvalueMonitor


def main(argv: list[str] | None = None) -> dict[str, dict[str, float | str]]:
    parser = common.parser(__doc__, out="lightning_logs/edge_of_stability")
    parser.set_defaults({"data.batch_size": 0, "data.one_hot": True, "data.limit": 1000})
    parser.add_argument("--lrs", type=list[float], default=[0.2, 0.4], help="GD learning rates")
    parser.add_argument(
        "--adam_lrs", type=list[float], default=[0.002], help="full-batch Adam learning rates"
    )
    parser.add_argument("--steps", type=int, default=2000, help="GD steps of each run")
    parser.add_argument("--width", type=int, default=64, help="units of each of 2 hidden layers")
    parser.add_argument("--every", type=int, default=50, help="measure every this many steps")
    config = parser.parse_args(argv)
    steps, every = (10, 5) if config.smoke else (config.steps, config.every)
    runner = common.Runner(parser, config)
    runs = [("gd", lr) for lr in config.lrs] + [("adam", lr) for lr in config.adam_lrs]
    for optimizer, lr in runs:
        L.seed_everything(config.seed)
        data = common.ImageDataModule(**config.data)
        widths = (config.width, config.width)
        model = common.Classifier(data.input_dim, widths, "tanh", "mse", lr, optimizer=optimizer)
        monitor = HessianEigenvalueMonitor(
            every_n_steps=every, measure_at_start=True, which="largest", tol=1e-3
        )
        runner.fit(f"{optimizer}_lr_{lr:g}", model, data, [monitor], steps=steps)
    if not runner.is_main:
        return {}
    verdict = {}
    for (optimizer, lr), log_dir in zip(runs, runner.log_dirs.values()):
        scalars = common.read_scalars(log_dir)
        # Adam's stability is decided by the preconditioned sharpness, GD's by λ_max itself
        tag = "preconditioned_lambda_max" if optimizer == "adam" else "lambda_max"
        sharpness = scalars[f"landscape/hessian/{tag}"]
        measured = [sharpness[s] for s in sorted(sharpness)]
        tail = measured[-max(len(measured) // 5, 1) :]  # the last fifth of the run
        threshold = (
            common.last(scalars, "landscape/hessian/preconditioned_threshold")
            if optimizer == "adam"
            else 2 / lr
        )
        verdict[f"{optimizer} η={lr:g}"] = {
            "sharpness": "λ_max(P⁻¹H)" if optimizer == "adam" else "λ_max",
            "threshold": threshold,
            "at start": measured[0],
            "last fifth": sum(tail) / len(tail),
            "ratio to threshold": sum(tail) / len(tail) / threshold,
            "final loss": common.last(scalars, "final/train_loss"),
        }
    runner.conclude("Edge of stability: full-batch training, MSE loss", "run", verdict)
    return verdict


if __name__ == "__main__":
    main()
