"""Train a small network on the bundled digits with the main landscape monitors.

Writes TensorBoard logs and a one-page summary picture, and prints where both are:

    python examples/demo.py                      # about a minute on a laptop CPU
    tensorboard --logdir lightning_logs/demo     # the curves, the custom-scalars layout, the images
"""

from __future__ import annotations

import os
import sys

import lightning as L

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

from lightning_landscape import (
    GradientNoiseScaleMonitor,
    GradientNormMonitor,
    HessianEigenvalueMonitor,
    HessianSpectrumMonitor,
    LossLandscapeMonitor,
    SharpnessMonitor,
)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = common.parser(__doc__, out="lightning_logs/demo")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    config = parser.parse_args(argv)
    L.seed_everything(config.seed)
    every = 4 if config.smoke else 60
    callbacks = [
        HessianEigenvalueMonitor(every_n_steps=every, measure_at_start=True),
        SharpnessMonitor(every_n_steps=every),
        GradientNormMonitor(),
        GradientNoiseScaleMonitor(every_n_steps=max(every // 4, 1)),
        HessianSpectrumMonitor(every_n_epochs=None, measure_at_end=True),
        LossLandscapeMonitor(resolution=9 if config.smoke else 21),
    ]
    data = common.ImageDataModule(**config.data)
    model = common.Classifier(data.input_dim, hidden=(64,), lr=config.lr, momentum=0.9)
    runner = common.Runner(parser, config)
    log_dir = runner.fit(
        "run",
        model,
        data,
        callbacks,
        max_epochs=1 if config.smoke else config.epochs,
        max_steps=8 if config.smoke else -1,
    )
    if not runner.is_main:
        return {}
    tags = (
        "hessian/lambda_max",
        "hessian/lambda_min",
        "hessian/stability_threshold",
        "spectrum/trace",
        "sharpness/sam",
        "noise_scale/b_simple",
    )
    scalars = common.read_scalars(log_dir)
    final = {tag: common.last(scalars, f"landscape/{tag}") for tag in tags}
    final["test accuracy"] = common.last(scalars, "final/test_acc")
    runner.conclude("Where training ended", "measure", {k: {"value": v} for k, v in final.items()})
    return final


if __name__ == "__main__":
    main()
