"""Initial scaling decides whether a deep network trains.

The same 6-hidden-layer tanh network on digits, initialised seven ways by the
``Initializer`` callback: Xavier (with the tanh gain) and Kaiming (proper scaling), LSUV
(unit output variance layer by layer), all-zero and all-one weights (every unit of a
layer stays identical), and a normal draw whose scale is too large (tanh saturates) or
too small (the signal vanishes). The table shows what the signal report flagged at
initialisation and the accuracy each run reached with the same budget.

    python examples/initialization.py             # about a minute on a laptop CPU
"""

from __future__ import annotations

import os
import sys

import lightning as L
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

from lightning_landscape import GradientNormMonitor, Initializer

SCHEMES: dict[str, dict] = {
    "xavier": {"rules": {nn.Linear: "xavier_normal"}},
    "kaiming": {"rules": {nn.Linear: "kaiming_normal"}},
    "lsuv": {"lsuv": True},
    "zeros": {"rules": {nn.Linear: "zeros"}},
    "ones": {"rules": {nn.Linear: "ones"}},
    "normal_std_1": {"rules": {nn.Linear: {"scheme": "normal", "std": 1.0}}},
    "normal_std_0.01": {"rules": {nn.Linear: {"scheme": "normal", "std": 0.01}}},
}


def main(argv: list[str] | None = None) -> dict[str, dict[str, object]]:
    parser = common.parser(__doc__, out="lightning_logs/initialization")
    parser.add_argument("--schemes", type=list[str], default=list(SCHEMES), help="which to run")
    parser.add_argument("--depth", type=int, default=6, help="hidden layers")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs")
    parser.add_argument("--lr", type=float, default=0.02, help="SGD learning rate")
    config = parser.parse_args(argv)
    unknown = set(config.schemes) - set(SCHEMES)
    if unknown:
        parser.error(f"--schemes: unknown {sorted(unknown)}; known: {', '.join(SCHEMES)}")
    runner = common.Runner(parser, config)
    signals = {}
    for name in config.schemes:
        L.seed_everything(config.seed)
        data = common.ImageDataModule(**config.data)
        model = common.Classifier(
            data.input_dim, (64,) * config.depth, "tanh", lr=config.lr, momentum=0.9
        )
        initializer = Initializer(**SCHEMES[name], seed=config.seed)
        runner.fit(
            name,
            model,
            data,
            [initializer, GradientNormMonitor()],
            max_epochs=config.epochs,
            max_steps=5 if config.smoke else -1,
            log_every_n_steps=5,
        )
        signals[name] = initializer.signal
    if not runner.is_main:
        return {}
    verdict = {}
    for name, log_dir in runner.log_dirs.items():
        scalars = common.read_scalars(log_dir)
        signal = signals[name]
        flags = sorted({flag for layer in signal.flagged for flag in layer.flags})
        verdict[name] = {
            "flagged at init": ", ".join(flags) or "-",
            "first-layer activation std": signal.layers[0].activation_std,
            "first-layer gradient std": signal.layers[0].gradient_std,
            "train acc": common.last(scalars, "final/train_acc"),
            "test acc": common.last(scalars, "final/test_acc"),
        }
    runner.conclude(
        "Initial scaling: signal report at init, accuracy at the end", "scheme", verdict
    )
    return verdict


if __name__ == "__main__":
    main()
