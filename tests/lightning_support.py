"""Small Lightning projects on scikit-learn's bundled digits, for the callback tests."""

from __future__ import annotations

import glob
import os
import warnings
from datetime import timedelta

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy
from sklearn.datasets import load_digits
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape.report import read_scalars  # noqa: F401  (re-exported for the tests)

# A rank left waiting in a collective that its peer never joins fails after this, where
# gloo's default would hold the test (and CI) for 30 minutes.
COLLECTIVE_TIMEOUT = timedelta(seconds=120)


def digits(n: int = 256) -> TensorDataset:
    data = load_digits()
    x = torch.tensor(data.data[:n], dtype=torch.float32) / 16.0
    return TensorDataset(x, torch.tensor(data.target[:n]))


class DigitsModel(pl.LightningModule):
    """A small CNN (BatchNorm, dropout) or MLP on 8x8 digits, SGD with momentum."""

    def __init__(
        self, arch: str = "cnn", lr: float = 0.05, momentum: float = 0.9, batch_size: int = 32
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if arch == "cnn":
            self.net = nn.Sequential(
                nn.Unflatten(1, (1, 8, 8)),
                nn.Conv2d(1, 4, 3),
                nn.BatchNorm2d(4),
                nn.ReLU(),
                nn.Flatten(),
                nn.Dropout(0.2),
                nn.Linear(144, 10),
            )
        else:
            self.net = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum
        )

    def train_dataloader(self):
        return DataLoader(digits(), batch_size=self.hparams.batch_size, shuffle=True)


class FourierDigits(DigitsModel):
    """A Fourier layer, as Fourier neural operators stack: the lowest modes of each image's
    spectrum mixed by learnt complex weights; under Adam."""

    def __init__(self) -> None:
        super().__init__()
        self.spectral = nn.Parameter(torch.randn(1, 4, 4, 3, dtype=torch.cfloat) / 4)
        self.net = nn.Sequential(nn.GELU(), nn.Flatten(), nn.Linear(256, 10))

    def spectral_weight(self) -> torch.Tensor:
        return self.spectral

    def forward(self, x):
        modes = torch.fft.rfft2(x.view(-1, 1, 8, 8))[..., :4, :3]
        mixed = torch.einsum("bixy,ioxy->boxy", modes, self.spectral_weight())
        return self.net(torch.fft.irfft2(mixed, s=(8, 8)))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class FourierDigitsTwin(FourierDigits):
    """The complex weights held as their real view: what they are measured as."""

    def __init__(self) -> None:
        super().__init__()
        self.spectral = nn.Parameter(torch.view_as_real(self.spectral.detach()).clone())

    def spectral_weight(self) -> torch.Tensor:
        return torch.view_as_complex(self.spectral)


class TwoOptimizers(DigitsModel):
    """Each layer of the MLP stepped by an optimiser of its own, as a GAN's two networks
    are (manual optimisation: every optimiser step counts as a global step)."""

    def __init__(self):
        super().__init__(arch="mlp")
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        for optimizer in self.optimizers():
            optimizer.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx))
        for optimizer in self.optimizers():
            optimizer.step()

    def configure_optimizers(self):
        first, second = self.net[0].parameters(), self.net[2].parameters()
        return torch.optim.SGD(first, lr=0.1), torch.optim.SGD(second, lr=0.01, momentum=0.9)


class NaNPastTheHead(DigitsModel):
    """Digits whose samples from index ``head`` on are NaN: a run that trains or measures
    on one of them fails (under ``overfit_batches``, or ``limit_train_batches`` without
    shuffling, only the head is trained on)."""

    head = 64
    shuffle = True

    def train_dataloader(self):
        x, y = digits().tensors
        x = x.clone()
        x[self.head :] = float("nan")
        return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=self.shuffle)


# benchmarks/gpu_check.sh reruns the monitor tests on a GPU through these two variables.
ACCELERATOR = os.environ.get("LANDSCAPE_TEST_ACCELERATOR", "cpu")
PRECISION = os.environ.get("LANDSCAPE_TEST_PRECISION")


class _KeptOnDevice(pl.Callback):
    """Brings the model back to the device it trained on after Lightning's teardown moved it
    to the CPU: a test compares it there with the monitors' probe batches, and dropout
    draws other masks on the CPU."""

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.to(trainer.strategy.root_device)


def trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    if ACCELERATOR != "cpu":
        kwargs = {"deterministic": "warn", **kwargs}  # bitwise comparisons need it on CUDA
        if PRECISION is not None:
            kwargs = {"precision": PRECISION, **kwargs}
        callbacks = [*callbacks, _KeptOnDevice()]
    defaults = {
        "accelerator": ACCELERATOR,
        "devices": 1,
        "max_steps": 10,
        "default_root_dir": tmp_path,
        "logger": pl.loggers.TensorBoardLogger(tmp_path, name="tb"),
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": callbacks,
    }
    return pl.Trainer(**{**defaults, **kwargs})


class DigitsStream(torch.utils.data.IterableDataset):
    """The digits as an iterable dataset, in order: the monitors keep live probe batches."""

    def __iter__(self):
        return iter(zip(*digits().tensors))


class Graphs:
    """A custom batch type, as PyG's ``Batch``: the loss alone knows what is inside."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def to(self, device: torch.device) -> Graphs:  # what Lightning moves batches with
        return Graphs(self.x.to(device), self.y.to(device))


def graphs_count(batch: Graphs) -> int:
    return len(batch.y)


def _collate_graphs(rows) -> Graphs:
    return Graphs(*torch.utils.data.default_collate(rows))


class CustomBatches(DigitsModel):
    """Digits in batches of the custom type :class:`Graphs`."""

    def train_dataloader(self):
        return DataLoader(digits(), batch_size=32, shuffle=True, collate_fn=_collate_graphs)

    def training_step(self, batch, batch_idx):
        return super().training_step((batch.x, batch.y), batch_idx)


def fit_ddp_spawn(log_dir, callbacks, model, ckpt_path=None, **kwargs):
    """Fit on 2 CPU processes; return the log folder.

    No retries: gloo aborted one such worker in five at interpreter exit until our
    callbacks had the process group destroyed before it (see
    ``end_process_group_at_exit``), and these runs are where that shows.
    """
    spawn = DDPStrategy(start_method="spawn", timeout=COLLECTIVE_TIMEOUT)
    trainer(log_dir, callbacks, devices=2, strategy=spawn, **kwargs).fit(model, ckpt_path=ckpt_path)
    return log_dir


def has_custom_scalars_layout(log_dir) -> bool:
    for path in glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True):
        events = EventAccumulator(path)
        events.Reload()
        if "custom_scalars__config__" in events.Tags().get("tensors", []):
            return True
    return False


def _final_state(log_dir, callbacks, model_class, trainer_kwargs) -> list[torch.Tensor]:
    pl.seed_everything(0)
    model = model_class()
    fit = trainer(log_dir, callbacks, logger=False, **trainer_kwargs)
    fit.fit(model)
    optimizer_state = fit.optimizers[0].state_dict()["state"].values()
    return [
        *(p.detach().clone() for p in model.parameters()),
        *(b.clone() for b in model.buffers()),
        *(
            t.clone()
            for state in optimizer_state
            for t in state.values()
            if isinstance(t, torch.Tensor)
        ),
    ]


def assert_run_unchanged(
    tmp_path, callbacks, model_class=DigitsModel, project_callbacks=list, **trainer_kwargs
) -> None:
    """A seeded run (dropout, BatchNorm, shuffled loader) ends with bitwise the same weights,
    buffers and optimizer state with ``callbacks`` as without them; ``project_callbacks()``
    builds the project's own callbacks, which both runs have."""
    plain = _final_state(tmp_path / "without", project_callbacks(), model_class, trainer_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no logger: the monitors say so once
        observed = _final_state(
            tmp_path / "with", [*project_callbacks(), *callbacks], model_class, trainer_kwargs
        )
    assert len(plain) == len(observed)
    assert all(torch.equal(a, b) for a, b in zip(plain, observed))
