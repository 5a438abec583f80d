"""Full-batch gradient descent sharpens until λ_max reaches 2/η, then hovers there.

Cohen et al. (2021): with full-batch GD at learning rate η, the Hessian's top eigenvalue
rises during training ("progressive sharpening") until it reaches the stability
threshold 2/η, and then stays near it while the loss keeps falling, non-monotonically
("edge of stability"). The MSE loss shows it early; with cross-entropy sharpness falls
late in training. One run per learning rate on 1000 digits; the summary picture draws
λ_max next to each run's dashed 2/η.

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


def main(argv: list[str] | None = None) -> dict[float, dict[str, float]]:
    parser = common.parser(__doc__, out="lightning_logs/edge_of_stability")
    parser.set_defaults({"data.batch_size": 0, "data.one_hot": True, "data.limit": 1000})
    parser.add_argument("--lrs", type=list[float], default=[0.2, 0.4], help="learning rates")
    parser.add_argument("--steps", type=int, default=2000, help="GD steps of each run")
    parser.add_argument("--width", type=int, default=64, help="units of each of 2 hidden layers")
    parser.add_argument("--every", type=int, default=50, help="measure every this many steps")
    config = parser.parse_args(argv)
    steps, every = (10, 5) if config.smoke else (config.steps, config.every)
    runner = common.Runner(parser, config)
    for lr in config.lrs:
        L.seed_everything(config.seed)
        data = common.ImageDataModule(**config.data)
        model = common.Classifier(data.input_dim, (config.width, config.width), "tanh", "mse", lr)
        monitor = HessianEigenvalueMonitor(
            every_n_steps=every, measure_at_start=True, which="largest", tol=1e-3
        )
        runner.fit(
            f"lr_{lr:g}",
            model,
            data,
            [monitor],
            steps=steps,
        )
    if not runner.is_main:
        return {}
    verdict = {}
    for lr, log_dir in zip(config.lrs, runner.log_dirs.values()):
        sharpness = common.read_scalars(log_dir)["landscape/hessian/lambda_max"]
        measured = [sharpness[s] for s in sorted(sharpness)]
        tail = measured[-max(len(measured) // 5, 1) :]  # the last fifth of the run
        verdict[lr] = {
            "2/η": 2 / lr,
            "λ_max at start": measured[0],
            "λ_max, last fifth": sum(tail) / len(tail),
            "ratio to 2/η": sum(tail) / len(tail) * lr / 2,
            "final loss": common.last(log_dir, "final/train_loss"),
        }
    runner.conclude("Edge of stability: full-batch GD, MSE loss", "η", verdict)
    return verdict


if __name__ == "__main__":
    main()
