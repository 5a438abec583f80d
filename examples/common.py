"""What the example projects share: data, the command line, training runs and the verdict table.

Data: scikit-learn's bundled digits (1797 images of 8x8, no download) by default, or
CIFAR-10 through torchvision for users with internet access. Command line: Lightning's
own argument parser, so every ``Trainer`` argument works as ``--trainer.<name>`` (e.g.
``--trainer.devices 8 --trainer.strategy ddp``) next to the example's own flags.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape.report import (
    Scalars,
    read_scalars,  # noqa: F401  (re-exported for the examples)
    render,
)

Dataset = Literal["digits", "cifar10"]


class ImageDataModule(L.LightningDataModule):
    """Flattened images with a held-out test split; ``batch_size`` is what schedulers change.

    Args:
        batch_size: per-device batch size; ``0`` or more than the train set: full batch.
        dataset: ``"digits"`` (bundled with scikit-learn) or ``"cifar10"`` (downloaded).
        data_dir: where CIFAR-10 is downloaded to.
        test_fraction: share of the examples held out for testing.
        one_hot: targets as one-hot vectors (for the MSE loss) instead of class indices.
        limit: use only the first this many examples (``None``: all).
        seed: seed of the train/test split.
    """

    def __init__(
        self,
        batch_size: int = 32,
        dataset: Dataset = "digits",
        data_dir: str = "data",
        test_fraction: float = 0.2,
        one_hot: bool = False,
        limit: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.dataset, self.data_dir = dataset, data_dir
        self.test_fraction, self.one_hot, self.limit, self.seed = (
            test_fraction,
            one_hot,
            limit,
            seed,
        )
        self.train: TensorDataset | None = None
        self.test: TensorDataset | None = None

    @property
    def input_dim(self) -> int:
        return 64 if self.dataset == "digits" else 3 * 32 * 32

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        x, y = _digits() if self.dataset == "digits" else _cifar10(self.data_dir)
        if self.limit is not None:
            x, y = x[: self.limit], y[: self.limit]
        targets = F.one_hot(y, 10).float() if self.one_hot else y
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        n_test = int(len(x) * self.test_fraction)
        test, train = order[:n_test], order[n_test:]
        self.train = TensorDataset(x[train], targets[train])
        self.test = TensorDataset(x[test], targets[test])

    def _size(self, dataset: TensorDataset) -> int:
        return len(dataset) if self.batch_size <= 0 else min(self.batch_size, len(dataset))

    def train_dataloader(self) -> DataLoader:
        assert self.train is not None
        return DataLoader(self.train, batch_size=self._size(self.train), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        assert self.test is not None
        return DataLoader(self.test, batch_size=512)


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    return (x - x.mean(0)) / (x.std(0) + 1e-3), torch.tensor(data.target)


def _cifar10(data_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from torchvision.datasets import CIFAR10
    except ImportError as err:
        raise RuntimeError("CIFAR-10 needs torchvision: pip install torchvision") from err
    try:
        data = CIFAR10(data_dir, train=True, download=True)
    except Exception as err:  # URLError, socket errors, checksum failures
        raise RuntimeError(
            f"could not download CIFAR-10 to {data_dir!r} ({err}); offline, run with the "
            "bundled digits instead: --data.dataset digits"
        ) from err
    x = torch.tensor(data.data, dtype=torch.float32).flatten(1) / 255.0
    return (x - x.mean(0)) / x.std(0), torch.tensor(data.targets)


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    labels = targets.argmax(1) if targets.dim() == 2 else targets
    return (logits.argmax(1) == labels).float().mean()


class Classifier(L.LightningModule):
    """An MLP trained by SGD, with cross-entropy or the MSE loss ½‖f(x) − onehot(y)‖².

    Args:
        input_dim: size of the flattened input.
        hidden: widths of the hidden layers.
        activation: ``"tanh"`` or ``"relu"``.
        loss: ``"cross_entropy"`` (class targets) or ``"mse"`` (one-hot targets).
        lr: learning rate.
        momentum: SGD momentum.
        optimizer: ``"sgd"`` or ``"adam"`` (its default betas).
    """

    def __init__(
        self,
        input_dim: int = 64,
        hidden: Sequence[int] = (64,),
        activation: Literal["tanh", "relu"] = "tanh",
        loss: Literal["cross_entropy", "mse"] = "cross_entropy",
        lr: float = 0.1,
        momentum: float = 0.0,
        optimizer: Literal["sgd", "adam"] = "sgd",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        widths = [input_dim, *hidden]
        layers: list[torch.nn.Module] = []
        for fan_in, fan_out in itertools.pairwise(widths):
            layers += [torch.nn.Linear(fan_in, fan_out), _ACTIVATIONS[activation]()]
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(widths[-1], 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        out = self(x)
        if self.hparams.loss == "mse":
            return 0.5 * ((out - y) ** 2).sum(1).mean(), accuracy(out, y)
        return F.cross_entropy(out, y), accuracy(out, y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, acc = self.loss(batch)
        self.log_dict({"train/loss": loss, "train/acc": acc})
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, acc = self.loss(batch)
        self.log_dict({"val/loss": loss, "val/acc": acc}, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum
        )


_ACTIVATIONS = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}


def parser(description: str | None, out: str) -> LightningArgumentParser:
    """Lightning's parser with every ``--trainer.*`` flag and the flags all examples share.

    Args:
        description: the example's help text.
        out: default root of the TensorBoard logs.
    """
    parser = LightningArgumentParser(description=description)
    parser.add_lightning_class_args(L.Trainer, "trainer")
    parser.add_class_arguments(ImageDataModule, "data", instantiate=False)
    parser.add_argument("--out", type=str, default=out, help="root of the TensorBoard logs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the runs")
    parser.add_argument("--smoke", type=bool, default=False, help="a few steps only (CI)")
    return parser


class Runner:
    """Trains an example's runs one after the other and reports on them.

    Args:
        parser: the example's parser (to tell the ``--trainer.*`` flags the user set).
        config: the parsed command line.
    """

    def __init__(self, parser: LightningArgumentParser, config: Any) -> None:
        defaults = parser.get_defaults().trainer
        # The flags the user set win over the example's own choices.
        self.overrides = {k: v for k, v in config.trainer.items() if v != defaults.get(k)}
        self.out: str = config.out
        self.log_dirs: dict[str, str] = {}
        self.is_main = True

    def fit(
        self,
        name: str,
        model: L.LightningModule,
        data: L.LightningDataModule,
        callbacks: Sequence[L.Callback],
        steps: int | None = None,
        **trainer_kwargs: Any,
    ) -> str:
        """Train one run with its own TensorBoard logger; return its log directory.

        A :class:`Classifier`'s final loss and accuracy on the whole train and test sets
        are logged as ``final/{train,test}_{loss,acc}`` at the last step.

        Args:
            name: the run's name (its log folder).
            model: the LightningModule.
            data: the DataModule.
            callbacks: the run's callbacks.
            steps: a budget of optimizer steps instead of epochs, without validation.
            trainer_kwargs: the example's other Trainer settings.
        """
        if steps is not None:
            trainer_kwargs = {
                "max_steps": steps,
                "max_epochs": -1,
                "limit_val_batches": 0,
                **trainer_kwargs,
            }
        settings = {
            "devices": 1,
            "logger": TensorBoardLogger(self.out, name=name),
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            **trainer_kwargs,
            **self.overrides,
        }
        trainer = L.Trainer(callbacks=list(callbacks), **settings)
        trainer.fit(model, datamodule=data)
        self.is_main = trainer.is_global_zero  # under DDP the other ranks leave the reporting
        if self.is_main and isinstance(model, Classifier):
            final = {}
            for split, dataset in (("train", data.train), ("test", data.test)):
                loss, acc = evaluate(model, dataset)
                final.update({f"final/{split}_loss": loss, f"final/{split}_acc": acc})
            trainer.logger.log_metrics(final, step=trainer.global_step)
            trainer.logger.save()
        self.log_dirs[name] = trainer.logger.log_dir
        return self.log_dirs[name]

    def conclude(self, title: str, first: str, verdict: dict[Any, dict[str, Any]]) -> None:
        """Print the verdict table (a row per run) and draw the runs' summary picture."""
        headers = [first, *next(iter(verdict.values()))]
        rows = [[name, *row.values()] for name, row in verdict.items()]
        print_verdict(title, headers, rows)
        picture = render(list(self.log_dirs.values()), os.path.join(self.out, "summary.png"))
        print(f"\nTensorBoard logs: {self.out}  (tensorboard --logdir {self.out})")
        print(f"summary picture:  {picture}")


@torch.no_grad()
def evaluate(model: Classifier, dataset: TensorDataset) -> tuple[float, float]:
    """Loss and accuracy on a whole dataset, in eval mode."""
    model.eval()
    x, y = (t.to(model.device) for t in dataset.tensors)
    loss, acc = model.loss((x, y))
    return float(loss), float(acc)


def last(scalars: Scalars, tag: str) -> float:
    """The last logged value of ``tag`` among a run's scalars (from :func:`read_scalars`)."""
    values = scalars[tag]
    return values[max(values)]


def print_verdict(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    print(f"\n{title}\n{line}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print(line)
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print(line)
