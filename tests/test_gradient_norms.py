"""Grouped gradient norms: the pure functions and GradientNormMonitor in a Trainer run."""

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import grad_norm

from lightning_landscape import GradientNormMonitor
from lightning_landscape.callbacks import gradients as gradients_callback
from lightning_landscape.gradients import group_norms, parameter_groups
from tests.lightning_support import (
    DigitsModel,
    TwoOptimizers,
    assert_run_unchanged,
    read_scalars,
    trainer,
)


def test_grouping():
    names = ["net.0.weight", "net.0.bias", "net.4.weight", "head.weight"]
    assert parameter_groups(names) == ["net.0", "net.0", "net.4", "head"]  # by layer
    assert parameter_groups(names, "module") == ["net", "net", "net", "head"]
    assert parameter_groups(names, "module", depth=2) == [
        "net.0",
        "net.0",
        "net.4",
        "head.weight",
    ]
    # a parametrized weight's tensors (weight norm's g and v) and a root-level parameter
    # and one of a network compiled in place (``self.net = torch.compile(net)``)
    others = [
        "net.0.parametrizations.weight.original0",
        "net.0.bias",
        "temperature",
        "net._orig_mod.2.weight",
    ]
    assert parameter_groups(others) == ["net.0", "net.0", "temperature", "net.2"]
    assert parameter_groups(names, "parameter") == names
    assert parameter_groups(names, "regex", patterns=[r"bias$", r"^net"]) == [
        "^net",
        "bias$",
        "^net",
        "other",
    ]
    # a block held under two names is found by a pattern of either
    aliases = [[n, n.replace("net", "backbone")] if n.startswith("net") else [n] for n in names]
    assert parameter_groups(names, "regex", patterns=["^backbone"], aliases=aliases) == [
        "^backbone",
        "^backbone",
        "^backbone",
        "other",
    ]


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
def test_group_norms_equal_the_norm_of_the_concatenation(norm_type):
    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(3, 4, generator=g),
        torch.randn(5, generator=g),
        torch.randn(2, 2, generator=g),
    ]
    per_group, total = group_norms(tensors, ["a", "b", "a"], norm_type)
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])
    torch.testing.assert_close(
        per_group["a"], torch.linalg.vector_norm(flat([tensors[0], tensors[2]]), norm_type)
    )
    torch.testing.assert_close(per_group["b"], torch.linalg.vector_norm(tensors[1], norm_type))
    torch.testing.assert_close(total, torch.linalg.vector_norm(flat(tensors), norm_type))


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
def test_a_sparse_gradient_has_the_norms_of_its_dense_form(norm_type):
    # an embedding's sparse gradient: rows 1 and 3 stored, row 3 twice (summed when dense)
    indices = torch.tensor([[3, 1, 3]])
    sparse = torch.sparse_coo_tensor(
        indices,
        torch.tensor([[1.0, -2.0], [0.5, 4.0], [2.0, 3.0]]),
        (5, 2),
        check_invariants=True,
    )
    dense = torch.randn(3, generator=torch.Generator().manual_seed(0))
    per_group, total = group_norms([sparse, dense], ["embedding", "head"], norm_type)
    torch.testing.assert_close(
        per_group["embedding"], torch.linalg.vector_norm(sparse.to_dense(), norm_type)
    )
    everything = torch.cat([sparse.to_dense().reshape(-1), dense])
    torch.testing.assert_close(total, torch.linalg.vector_norm(everything, norm_type))


def test_a_failing_read_warns_once_and_training_goes_on(tmp_path, monkeypatch):
    def unforeseen(*args, **kwargs):
        raise RuntimeError("an op we did not foresee")

    monkeypatch.setattr(gradients_callback, "tensor_norms", unforeseen)
    fit = trainer(tmp_path, [GradientNormMonitor(every_n_steps=1)], max_steps=4)
    with pytest.warns(UserWarning, match="skipped the measurement at step 0: an op") as caught:
        fit.fit(DigitsModel())
    assert len([w for w in caught if "GradientNormMonitor" in str(w.message)]) == 1
    assert fit.global_step == 4
    assert not [tag for tag in read_scalars(tmp_path) if "grad_norm" in tag]


class _LightningGradNorm(Callback):
    """Records Lightning's own grad_norm at the same hook, after the monitor."""

    def __init__(self):
        self.seen = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.seen[trainer.global_step] = grad_norm(pl_module, 2)


def test_matches_lightning_grad_norm_before_clipping(tmp_path):
    pl.seed_everything(0)
    reference = _LightningGradNorm()
    monitor = GradientNormMonitor(group_by="parameter", every_n_steps=2)
    trainer(tmp_path, [monitor, reference], max_steps=6, gradient_clip_val=1e-3).fit(DigitsModel())
    logged = read_scalars(tmp_path)
    assert sorted(logged["landscape/grad_norm/total"]) == [0, 2, 4]
    for step in (0, 2, 4):
        expected = reference.seen[step]
        assert logged["landscape/grad_norm/total"][step] == pytest.approx(
            float(expected["grad_2.0_norm_total"]), rel=1e-5
        )
        assert logged["landscape/grad_norm/net.1.weight"][step] == pytest.approx(
            float(expected["grad_2.0_norm/net.1.weight"]), rel=1e-5
        )
        assert logged["landscape/grad_norm/total"][step] > 1e-3  # read before clipping to 1e-3


class _SteppedGradients(Callback):
    """The gradient and weight of each parameter as its optimiser is about to step, by step."""

    def __init__(self):
        self.grads, self.weights = {}, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for name, p in pl_module.named_parameters():
            if id(p) in stepped:
                self.grads[name, trainer.global_step] = p.grad.clone()
                self.weights[name, trainer.global_step] = p.detach().clone()


def test_every_optimizers_parameters_are_logged_at_the_step_their_batch_began(tmp_path):
    """Two optimiser steps a batch: the second's parameters, read at odd steps, used to be
    left out by a cadence of even steps. Logged at the loggers' count of batches."""
    pl.seed_everything(0)
    recorder = _SteppedGradients()
    monitor = GradientNormMonitor(
        group_by="parameter", every_n_steps=4, weight_norms=True, update_ratio=True
    )
    model = TwoOptimizers()
    trainer(tmp_path, [monitor, recorder], max_steps=12).fit(model)
    logged = read_scalars(tmp_path)
    names = [name for name, _ in model.named_parameters()]
    read_at = {name: 0 if name.startswith("net.0.") else 1 for name in names}
    for batch in (0, 2, 4):
        step = 2 * batch  # the global step the batch began at
        grads = [recorder.grads[name, step + read_at[name]] for name in names]
        for name, grad in zip(names, grads):
            assert logged[f"landscape/grad_norm/{name}"][batch] == pytest.approx(float(grad.norm()))
        whole = torch.cat([g.reshape(-1) for g in grads]).norm()
        assert logged["landscape/grad_norm/total"][batch] == pytest.approx(float(whole))
        weights = torch.cat([recorder.weights[n, step + read_at[n]].reshape(-1) for n in names])
        assert logged["landscape/weight_norm/total"][batch] == pytest.approx(float(weights.norm()))
    assert sorted(logged["landscape/grad_norm/total"]) == [0, 2, 4]
    assert sorted(logged["landscape/update_ratio/net.2.weight"]) == [0, 2, 4]
    assert all(0 < v < 1 for v in logged["landscape/update_ratio/total"].values())


def test_a_cadence_is_kept_when_a_batch_steps_several_optimizers(tmp_path):
    """Batches begin at even steps: every 3 steps is the first batch at or past each
    multiple (global steps 0, 4, 6, 10), logged at the loggers' count of batches."""
    trainer(tmp_path, [GradientNormMonitor(every_n_steps=3)], max_steps=12).fit(TwoOptimizers())
    assert sorted(read_scalars(tmp_path)["landscape/grad_norm/total"]) == [0, 2, 3, 5]


def test_a_second_fit_is_logged_from_its_first_step(tmp_path):
    monitor = GradientNormMonitor(every_n_steps=50)
    for run in ("first", "second"):
        trainer(tmp_path / run, [monitor], max_steps=3).fit(DigitsModel())
        assert sorted(read_scalars(tmp_path / run)["landscape/grad_norm/total"]) == [0]


def test_a_resumed_run_keeps_the_cadence_of_the_run_it_continues(tmp_path):
    """Stopped at step 5 of a cadence of 4, it logs next at 8, as the unbroken run does:
    not at 5, as if the block of step 4 were not logged yet."""
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = trainer(
        tmp_path / "a",
        [GradientNormMonitor(every_n_steps=4), checkpoint],
        max_steps=5,
        enable_checkpointing=True,
    )
    first.fit(DigitsModel())
    assert sorted(read_scalars(tmp_path / "a")["landscape/grad_norm/total"]) == [0, 4]
    resumed = trainer(tmp_path / "b", [GradientNormMonitor(every_n_steps=4)], max_steps=10)
    resumed.fit(DigitsModel(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert sorted(read_scalars(tmp_path / "b")["landscape/grad_norm/total"]) == [8]


def test_monitors_of_other_groups_keep_their_own_checkpointed_state(tmp_path):
    """Lightning refuses two callbacks whose states share a key."""
    monitors = [GradientNormMonitor(), GradientNormMonitor(group_by="parameter")]
    trainer(tmp_path, monitors, max_steps=1).fit(DigitsModel())
    assert len({monitor.state_key for monitor in monitors}) == 2


def test_under_gradient_accumulation_the_accumulated_gradient_is_read(tmp_path):
    """Three batches begin at each step; the third's optimiser step reads their sum."""
    pl.seed_everything(0)
    reference = _LightningGradNorm()
    monitor = GradientNormMonitor(every_n_steps=2)
    fit = trainer(tmp_path, [monitor, reference], max_steps=5, accumulate_grad_batches=3)
    fit.fit(DigitsModel())
    logged = read_scalars(tmp_path)["landscape/grad_norm/total"]
    assert sorted(logged) == [0, 2, 4]
    for step, value in logged.items():
        assert value == pytest.approx(float(reference.seen[step]["grad_2.0_norm_total"]))


def test_update_ratios_take_the_norm_asked_for(tmp_path):
    pl.seed_everything(0)
    recorder = _SteppedGradients()
    monitor = GradientNormMonitor(norm_type=math.inf, update_ratio=True, every_n_steps=1)
    model = DigitsModel(arch="mlp")
    trainer(tmp_path, [monitor, recorder], max_steps=3).fit(model)
    ratios = read_scalars(tmp_path)["landscape/update_ratio/total"]
    names = [name for name, _ in model.named_parameters()]
    for step in (0, 1):
        before = torch.cat([recorder.weights[n, step].reshape(-1) for n in names])
        after = torch.cat([recorder.weights[n, step + 1].reshape(-1) for n in names])
        expected = (after - before).abs().max() / before.abs().max()
        assert ratios[step] == pytest.approx(float(expected), rel=1e-5)


def test_follows_log_every_n_steps_and_logs_weights_and_updates(tmp_path):
    pl.seed_everything(0)
    model = DigitsModel()
    monitor = GradientNormMonitor(weight_norms=True, update_ratio=True)
    trainer(tmp_path, [monitor], max_steps=7, log_every_n_steps=3).fit(model)
    logged = read_scalars(tmp_path)
    assert sorted(logged["landscape/grad_norm/net.1"]) == [0, 3, 6]  # the convolution
    assert sorted(logged["landscape/weight_norm/total"]) == [0, 3, 6]
    ratio = logged["landscape/update_ratio/total"]
    assert sorted(ratio) == [0, 3, 6] and all(0 < v < 1 for v in ratio.values())


def test_log_every_n_steps_zero_logs_nothing_unless_a_cadence_is_given(tmp_path):
    """Lightning logs nothing at ``log_every_n_steps=0``, which ``barebones=True`` sets;
    neither does the monitor that follows it, and it says so. One given its own cadence
    still reads, into ``callback_metrics`` as barebones has no logger."""
    with pytest.warns(UserWarning, match="log_every_n_steps=0"):
        trainer(tmp_path, [GradientNormMonitor()], max_steps=3, log_every_n_steps=0).fit(
            DigitsModel()
        )
    assert not any(tag.startswith("landscape/") for tag in read_scalars(tmp_path))
    reference = _LightningGradNorm()
    bare = pl.Trainer(
        barebones=True,
        max_steps=3,
        default_root_dir=tmp_path,
        callbacks=[GradientNormMonitor(every_n_steps=1), reference],
    )
    bare.fit(DigitsModel())
    assert float(bare.callback_metrics["landscape/grad_norm/total"]) == pytest.approx(
        float(reference.seen[2]["grad_2.0_norm_total"])
    )


class _AliasedBackbone(DigitsModel):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = self.net


def test_regex_groups_match_every_name_of_a_parameter(tmp_path):
    monitor = GradientNormMonitor(group_by="regex", patterns=["^backbone"], every_n_steps=1)
    trainer(tmp_path, [monitor], max_steps=1).fit(_AliasedBackbone())
    logged = read_scalars(tmp_path)
    assert logged["landscape/grad_norm/^backbone"][0] == pytest.approx(
        logged["landscape/grad_norm/total"][0]
    )
    assert "landscape/grad_norm/other" not in logged


def test_observer_effect_is_zero(tmp_path):
    monitor = GradientNormMonitor(every_n_steps=1, update_ratio=True, weight_norms=True)
    assert_run_unchanged(tmp_path, [monitor], max_steps=6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"norm_type": 0}, "`norm_type`"),
        ({"group_by": "block"}, "`group_by`"),
        ({"depth": 0}, "`depth`"),
        ({"group_by": "regex"}, "`patterns`"),
        ({"group_by": "regex", "patterns": ["("]}, "`patterns`"),
        ({"every_n_steps": 0}, "`every_n_steps`"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientNormMonitor(**kwargs)


def test_flags_must_be_booleans():
    with pytest.raises(TypeError, match="`update_ratio` must be True or False"):
        GradientNormMonitor(update_ratio="yes")


def test_read_after_amp_unscaling(tmp_path):
    """A CPU GradScaler multiplies the loss by 1024: the norms must be of the unscaled gradients."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    def total_norm(run_dir, **kwargs):
        pl.seed_everything(0)
        monitor = GradientNormMonitor(every_n_steps=1)
        trainer(run_dir, [monitor], max_steps=1, **kwargs).fit(DigitsModel(arch="mlp"))
        return read_scalars(run_dir)["landscape/grad_norm/total"][0]

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    amp = total_norm(tmp_path / "amp", plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    plain = total_norm(tmp_path / "fp32")
    assert amp == pytest.approx(plain, rel=0.05)  # float16 rounding, not a factor 1024
