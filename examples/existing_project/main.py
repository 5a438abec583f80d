"""An existing LightningCLI project: the landscape monitors come in through the config only.

The model and data below know nothing of lightning_landscape; ``landscape.yaml`` adds
every monitor to the Trainer. The same command runs on one CPU or many GPUs:

    python examples/existing_project/main.py fit --config examples/existing_project/landscape.yaml
    python examples/existing_project/main.py fit --config examples/existing_project/landscape.yaml \\
        --trainer.accelerator gpu --trainer.devices 8 --trainer.strategy ddp
    tensorboard --logdir lightning_logs/existing_project
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import Classifier, ImageDataModule, print_verdict


def main(argv: list[str] | None = None) -> dict[str, float]:
    cli = LightningCLI(Classifier, ImageDataModule, args=argv, save_config_callback=None)
    final = {
        name: float(value)
        for name, value in sorted(cli.trainer.callback_metrics.items())
        if name.startswith("landscape/") and not name.endswith(("seconds", "n_hvp"))
    }
    if cli.trainer.is_global_zero:
        print_verdict("Last landscape values", ["metric", "value"], list(final.items()))
        print(f"TensorBoard logs: {cli.trainer.logger.log_dir}")
    return final


if __name__ == "__main__":
    main()
