"""Grow the batch instead of decaying the learning rate: fewer steps, same accuracy.

Smith et al. (2017) showed that increasing the batch size during training can replace
learning-rate decay; McCandlish et al. (2018) that the gradient noise scale B_simple
estimates the batch size beyond which bigger batches stop paying. Three runs of the same
MLP on digits with the ``BatchSizeScheduler``:

- ``constant``: batch 16 throughout;
- ``geometric``: batch 16 doubling every few epochs up to 256, the learning rate
  coupled linearly with a short warmup after each increase (Goyal et al. 2017);
- ``noise_scale``: the batch follows the measured B_simple (``NoiseScaleSchedule``),
  learning rate coupled by the square root.

The table reports optimizer steps, wall time, final batch size and accuracy.

    python examples/batch_size_schedule.py          # about a minute on a laptop CPU
"""

from __future__ import annotations

import os
import sys
import time

import lightning as L

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

from lightning_landscape import BatchSizeScheduler, GradientNoiseScaleMonitor
from lightning_landscape.batch_size import NoiseScaleSchedule, Ramp


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = common.parser(__doc__, out="lightning_logs/batch_size_schedule")
    parser.set_defaults({"data.batch_size": 16})
    parser.add_argument("--epochs", type=int, default=16, help="training epochs")
    parser.add_argument("--lr", type=float, default=0.02, help="learning rate at the start")
    parser.add_argument("--max_batch", type=int, default=256, help="largest batch size")
    config = parser.parse_args(argv)
    epochs = 2 if config.smoke else config.epochs
    start = config.data["batch_size"]
    runs = {
        "constant": [],
        "geometric": [
            BatchSizeScheduler(
                Ramp(
                    config.max_batch, start_epoch=epochs // 4, end_epoch=3 * epochs // 4, multiple=8
                ),
                lr_scaling="linear",
                warmup_steps=10,
            )
        ],
        "noise_scale": [
            GradientNoiseScaleMonitor(every_n_steps=10),
            BatchSizeScheduler(
                NoiseScaleSchedule(min_size=start, max_size=config.max_batch, multiple=8),
                lr_scaling="sqrt",
            ),
        ],
    }
    runner = common.Runner(parser, config)
    seconds = {}
    for name, callbacks in runs.items():
        L.seed_everything(config.seed)
        data = common.ImageDataModule(**config.data)
        model = common.Classifier(data.input_dim, (128,), "relu", lr=config.lr, momentum=0.9)
        began = time.perf_counter()
        runner.fit(name, model, data, callbacks, max_epochs=epochs, log_every_n_steps=5)
        seconds[name] = time.perf_counter() - began
    if not runner.is_main:
        return {}
    verdict = {}
    for name, log_dir in runner.log_dirs.items():
        scalars = common.read_scalars(log_dir)
        sizes = scalars.get("landscape/batch_size/per_device", {0: start})
        verdict[name] = {
            "optimizer steps": max(scalars["final/train_acc"]),  # logged at the last step
            "wall seconds": seconds[name],
            "final batch": int(sizes[max(sizes)]),
            "train acc": common.last(scalars, "final/train_acc"),
            "test acc": common.last(scalars, "final/test_acc"),
        }
    runner.conclude(f"Batch-size schedules over {epochs} epochs", "schedule", verdict)
    return verdict


if __name__ == "__main__":
    main()
