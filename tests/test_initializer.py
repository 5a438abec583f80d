"""The Initializer callback: same weights as initialising by hand, LSUV, pretrained, resume, DDP."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import default_collate

from lightning_landscape import Initializer
from lightning_landscape.init import initialize
from tests.lightning_support import DigitsModel, fit_ddp_spawn, read_scalars, trainer

RULES = {nn.Conv2d: "kaiming_normal", nn.Linear: "xavier_uniform"}


def _weights(module):
    return [p.detach().cpu().clone() for p in module.parameters()]


class WeightsAtTrainStart(Callback):
    def on_train_start(self, trainer, pl_module):
        self.weights = _weights(pl_module)


def test_same_run_as_initializing_by_hand_and_the_report_is_logged(tmp_path):
    pl.seed_everything(0)
    by_hand = DigitsModel()
    initialize(by_hand, RULES, generator=3)
    trainer(tmp_path / "hand", [], logger=False).fit(by_hand)

    pl.seed_everything(0)
    model = DigitsModel()
    callback = Initializer(RULES, seed=3)
    trainer(tmp_path / "cb", [callback]).fit(model)
    assert all(torch.equal(a, b) for a, b in zip(_weights(by_hand), _weights(model)))
    assert [a.scheme for a in callback.applied.applied][::2] == ["kaiming_normal", "xavier_uniform"]
    logged = read_scalars(tmp_path / "cb")
    assert set(logged["landscape/signal/activation_std/net.1"]) == {0}
    assert logged["landscape/signal/gradient_std/net.6"][0] > 0
    assert not callback.signal.flagged


def test_lsuv_and_a_badly_scaled_start_is_reported(tmp_path):
    model = DigitsModel(arch="mlp")
    callback = Initializer(lsuv=True)
    trainer(tmp_path, [callback], max_steps=1).fit(model)
    assert set(callback.lsuv_variances) == {"net.0", "net.2"}
    assert all(abs(v - 1) < 0.1 for v in callback.lsuv_variances.values())

    bad = Initializer({nn.Linear: {"scheme": "normal", "std": 30.0}})
    with pytest.warns(UserWarning, match="badly scaled layers.*net.0 \\(.*saturating"):
        trainer(tmp_path / "bad", [bad], max_steps=1).fit(DigitsModel(arch="mlp"))


def test_pretrained_weights_are_loaded_and_resume_keeps_the_checkpoint(tmp_path):
    pl.seed_everything(1)
    source = DigitsModel()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path / "first", [checkpoint], max_steps=3, enable_checkpointing=True).fit(source)
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)

    seen = WeightsAtTrainStart()
    loaded = Initializer(pretrained=str(path), report=False)
    trainer(tmp_path / "pre", [loaded, seen], max_steps=1).fit(DigitsModel())
    assert all(torch.equal(a, b) for a, b in zip(seen.weights, _weights(source)))
    assert loaded.applied.missing == [] and len(loaded.applied.loaded) == len(source.state_dict())

    resumed = Initializer({nn.Linear: "zeros", nn.Conv2d: "zeros"})
    seen = WeightsAtTrainStart()
    trainer(tmp_path / "resume", [resumed, seen], max_steps=4, enable_checkpointing=True).fit(
        DigitsModel(), ckpt_path=checkpoint.last_model_path
    )
    assert all(torch.equal(a, b) for a, b in zip(seen.weights, _weights(source)))
    assert resumed.signal is None  # no report for weights the callback did not choose


def test_a_report_that_cannot_run_warns_and_training_goes_on(tmp_path):
    callback = Initializer(inputs_fn=lambda batch: batch[1])  # labels are no input
    fit = trainer(tmp_path, [callback], max_steps=2)
    with pytest.warns(UserWarning, match="skipped the signal report"):
        fit.fit(DigitsModel(arch="mlp"))
    assert fit.global_step == 2 and callback.signal is None


class DictBatches(DigitsModel):
    """Batches as dicts, as many datasets give them: the batch is not the model's input."""

    def train_dataloader(self):
        loader = super().train_dataloader()
        loader.collate_fn = lambda samples: dict(zip(("image", "label"), default_collate(samples)))
        return loader

    def training_step(self, batch, batch_idx):
        return super().training_step((batch["image"], batch["label"]), batch_idx)


def test_lsuv_on_batches_that_are_not_the_input_names_inputs_fn(tmp_path):
    with pytest.raises(ValueError, match="for LSUV \\(TypeError: .*give `inputs_fn`"):
        trainer(tmp_path, [Initializer(lsuv=True)], max_steps=1).fit(DictBatches(arch="mlp"))
    callback = Initializer(lsuv=True, inputs_fn=lambda batch: batch["image"])
    trainer(tmp_path / "picked", [callback], max_steps=1).fit(DictBatches(arch="mlp"))
    assert all(abs(v - 1) < 0.1 for v in callback.lsuv_variances.values())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"rules": {nn.Linear: "glorot"}}, ValueError, "unknown scheme"),
        ({"rules": {3: "zeros"}}, TypeError, "module classes or name regexes"),
        ({"lsuv": True, "pretrained": "w.pt"}, ValueError, "exclude each other"),
        ({"report": False}, ValueError, "nothing to do"),
        ({"rules": {}, "lsuv_tol": 0}, ValueError, "`lsuv_tol`"),
        ({"rules": {}, "inputs_fn": 3}, TypeError, "`inputs_fn`"),
        ({"rules": {}, "report": "no"}, TypeError, "`report`"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Initializer(**kwargs)


class SeedPerRank(Callback):
    """Give the Initializer that follows a different seed on every rank."""

    def __init__(self, initializer):
        self.initializer = initializer

    def setup(self, trainer, pl_module, stage):
        self.initializer.seed = trainer.global_rank


class SaveWeights(Callback):
    def __init__(self, directory):
        self.directory = directory

    def setup(self, trainer, pl_module, stage):
        torch.save(_weights(pl_module), self.directory / f"setup{trainer.global_rank}.pt")

    def on_train_start(self, trainer, pl_module):
        torch.save(_weights(pl_module), self.directory / f"start{trainer.global_rank}.pt")


@pytest.mark.timeout(240)
def test_ddp_ranks_train_from_rank_zero_weights(tmp_path):
    initializer = Initializer(RULES, report=False)
    callbacks = [SeedPerRank(initializer), initializer, SaveWeights(tmp_path)]
    fit_ddp_spawn(tmp_path, callbacks, DigitsModel(), max_steps=1)
    setup = [torch.load(tmp_path / f"setup{r}.pt") for r in (0, 1)]
    start = [torch.load(tmp_path / f"start{r}.pt") for r in (0, 1)]
    assert not torch.equal(setup[0][0], setup[1][0])  # the ranks did initialise differently
    for rank in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(start[rank], setup[0]))


class BuiltLater(DigitsModel):
    """A module whose layers `configure_model` creates (after the callbacks' `setup`)."""

    def __init__(self):
        pl.LightningModule.__init__(self)
        self.save_hyperparameters({"lr": 0.05, "momentum": 0.9, "batch_size": 32})
        self.net = None

    def configure_model(self):
        if self.net is None:
            self.net = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))


def test_a_model_built_in_configure_model_is_initialised_at_fit_start(tmp_path):
    reference = BuiltLater()
    reference.configure_model()
    initialize(reference, RULES, generator=3)
    seen = WeightsAtTrainStart()
    trainer(tmp_path, [Initializer(RULES, seed=3), seen], max_steps=1).fit(BuiltLater())
    assert all(torch.equal(a, b) for a, b in zip(seen.weights, _weights(reference)))


class Lazy(DigitsModel):
    """Layers that learn their input sizes from the first batch (``nn.LazyLinear``)."""

    def __init__(self):
        super().__init__(arch="mlp")
        self.net = nn.Sequential(nn.LazyLinear(16), nn.Tanh(), nn.LazyLinear(10))


def test_lazy_layers_are_materialised_on_the_first_batch_and_initialised(tmp_path):
    reference = DigitsModel(arch="mlp")  # the same layers, eager
    initialize(reference, RULES, generator=3)
    seen = WeightsAtTrainStart()
    trainer(tmp_path, [Initializer(RULES, seed=3), seen], max_steps=1).fit(Lazy())
    assert all(torch.equal(a, b) for a, b in zip(seen.weights, _weights(reference)))


@pytest.mark.timeout(240)
def test_ddp_lsuv_on_a_model_built_in_configure_model_is_broadcast(tmp_path):
    # a different seed per rank (as LSUV on different data would): the broadcast must win
    initializer = Initializer(lsuv=True, report=False)
    callbacks = [SeedPerRank(initializer), initializer, SaveWeights(tmp_path)]
    fit_ddp_spawn(tmp_path, callbacks, BuiltLater(), max_steps=1)
    start = [torch.load(tmp_path / f"start{r}.pt") for r in (0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(start[0], start[1]))
