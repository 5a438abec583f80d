"""Initialise the model before training starts, and report how a signal propagates through it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch.nn.parameter import is_lazy

from lightning_landscape import init
from lightning_landscape._batches import map_tensors
from lightning_landscape._context import device_of, module_mode
from lightning_landscape._distributed import broadcast_, distributed_active
from lightning_landscape._validation import check_bool, check_int, check_positive_float
from lightning_landscape.callbacks._logging import log_metrics
from lightning_landscape.callbacks.base import _SHARDED, LandscapeCallback


def _first_input(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


# What a forward pass raises on an input it cannot take (a dict batch passed whole).
_INPUT_ERRORS = (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError)
_INPUTS_FN_HINT = (
    "if the first element of a training batch is not the model's input, give `inputs_fn` "
    "to pick it out"
)


@contextlib.contextmanager
def _on_the_first_batch(purpose: str) -> Iterator[None]:
    """Name the input and ``inputs_fn`` when the model fails on it for ``purpose``."""
    try:
        yield
    except _INPUT_ERRORS as err:
        raise ValueError(
            f"Initializer: the model failed on the first training batch's input for "
            f"{purpose} ({type(err).__name__}: {err}); {_INPUTS_FN_HINT}"
        ) from err


class Initializer(LandscapeCallback):
    """Initialise the LightningModule by rule, from pretrained weights or by LSUV.

    The work happens in ``setup``, before the strategy wraps the model, so under DDP every
    rank trains from rank 0's weights (DDP broadcasts them when it wraps). A model whose
    layers ``configure_model`` builds (after ``setup``) is initialised when fitting starts
    and rank 0's weights are broadcast by the callback itself. Weights are
    drawn from a CPU generator seeded by ``seed``, so the same seed gives the same weights
    on any machine and any number of devices, whatever the global seed. When the run
    resumes from a checkpoint, Lightning restores the checkpoint's weights after ``setup``
    and they stand; no report is logged then. Lazy layers (``nn.LazyLinear``) first learn
    their shapes from one forward pass of the first training batch (eval mode, no
    gradients). Neither the data draw, that pass nor the report moves the training RNG
    streams.

    At the start of fitting the callback prints the signal report of
    :func:`lightning_landscape.init.signal_report` (activation and gradient std per layer),
    logs it under ``landscape/signal/`` at step 0, and warns about flagged layers
    (vanishing, exploding, saturating, symmetric).

    Args:
        rules: module class or name regex -> scheme (see
            :func:`lightning_landscape.init.initialize`); with ``pretrained``, the rules
            for what the pretrained source cannot fill.
        lsuv: run LSUV (orthogonal weights rescaled to unit output variance layer by
            layer) on the first training batch; replaces the matrix layers' ``rules``.
        lsuv_tol: accepted distance of each layer's output variance from 1.
        pretrained: path of a state dict, checkpoint (``weights_only``) or
            ``.safetensors`` file to load first.
        key_map: regex -> replacement applied to the pretrained keys.
        seed: seed of every random draw the initialisation makes.
        report: print, log and check the signal report when training starts.
        inputs_fn: ``inputs_fn(batch)`` gives the model's input from a training batch;
            by default the batch's first element (or the batch itself if it is a tensor).
    """

    def __init__(
        self,
        rules: dict[Any, Any] | None = None,
        lsuv: bool = False,
        lsuv_tol: float = 0.1,
        pretrained: str | None = None,
        key_map: dict[str, str] | None = None,
        seed: int = 0,
        report: bool = True,
        inputs_fn: Callable[[Any], Any] | None = None,
    ) -> None:
        super().__init__()
        if rules is not None:
            init.check_rules(rules)
        if lsuv and pretrained is not None:
            raise ValueError(
                "`lsuv` and `pretrained` exclude each other: LSUV replaces the weights"
            )
        if rules is None and not lsuv and pretrained is None and not report:
            raise ValueError(
                "nothing to do: give `rules`, `lsuv=True`, `pretrained` or `report=True`"
            )
        check_positive_float("lsuv_tol", lsuv_tol)
        check_int("seed", seed, minimum=0)
        if inputs_fn is not None and not callable(inputs_fn):
            raise TypeError(f"`inputs_fn` must be callable as inputs_fn(batch), got {inputs_fn!r}")
        self.rules = rules
        self.lsuv = check_bool("lsuv", lsuv)
        self.lsuv_tol = lsuv_tol
        self.pretrained = pretrained
        self.key_map = key_map
        self.seed = seed
        self.report = check_bool("report", report)
        self.inputs_fn = inputs_fn or _first_input
        self.applied: init.InitReport | init.PretrainedReport | None = None
        self.lsuv_variances: dict[str, float] | None = None
        self.signal: init.SignalReport | None = None
        self._deferred = False
        self._first_batch: Any = None  # drawn once for LSUV and the report, dropped after

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if next(pl_module.parameters(), None) is None:  # built later, in `configure_model`
            if isinstance(trainer.strategy, _SHARDED):
                raise ValueError(
                    f"Initializer cannot initialise a model that `configure_model` builds under "
                    f"{type(trainer.strategy).__name__}: its parameters are sharded"
                )
            self._deferred = True
            return
        self._initialize(trainer, pl_module)

    def _initialize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if any(is_lazy(p) for p in pl_module.parameters()):
            self._materialize(trainer, pl_module)
        generator = torch.Generator().manual_seed(self.seed)
        if self.pretrained is not None:
            self.applied = init.load_pretrained(
                pl_module, self.pretrained, self.key_map, rules=self.rules, generator=generator
            )
            rank_zero_info(f"Initializer: loaded {self.pretrained}\n{self.applied}")
        elif self.rules is not None:
            self.applied = init.initialize(pl_module, self.rules, generator)
        if self.lsuv:
            inputs = self._inputs(trainer, pl_module)
            if inputs is None:
                raise ValueError("Initializer(lsuv=True) needs training data: the Trainer has none")
            with module_mode(pl_module, "train"), _on_the_first_batch("LSUV"):
                self.lsuv_variances = init.lsuv(
                    pl_module, inputs, self.lsuv_tol, generator=generator
                )

    def _materialize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run the first training batch through the model once, so that lazy layers
        (``nn.LazyLinear``) learn their shapes before they are initialised."""
        inputs = self._inputs(trainer, pl_module)
        if inputs is None:
            raise ValueError(
                "Initializer needs training data to give the model's lazy layers their "
                "shapes: the Trainer has none"
            )
        with (
            isolate_rng(),
            torch.no_grad(),
            module_mode(pl_module, "eval"),
            _on_the_first_batch("the shapes of its lazy layers"),
        ):
            pl_module(inputs)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is not None:  # resumed: the checkpoint's weights stand
            return
        if self._deferred:
            # The strategy has wrapped the model already: make every rank hold rank 0's
            # weights ourselves (the seeded rules agree anyway; LSUV sees each rank's data).
            self._initialize(trainer, pl_module)
            if distributed_active():
                with torch.no_grad():
                    broadcast_(list(pl_module.parameters()) + list(pl_module.buffers()))
        if not self.report:
            return
        inputs = self._inputs(trainer, pl_module)
        if inputs is None:
            rank_zero_warn("Initializer: no training data to take the signal report on")
            return
        try:
            with module_mode(pl_module, "train"):
                self.signal = init.signal_report(pl_module, inputs, seed=self.seed)
        # An optional report: an input it cannot run on must not stop the user's training.
        except _INPUT_ERRORS as err:
            rank_zero_warn(
                f"Initializer: skipped the signal report ({type(err).__name__}: {err}); "
                f"{_INPUTS_FN_HINT}"
            )
            return
        rank_zero_info(f"Initializer: signal propagation at the initial weights\n{self.signal}")
        if self.signal.flagged:
            names = ", ".join(f"{s.name} ({', '.join(s.flags)})" for s in self.signal.flagged)
            rank_zero_warn(f"Initializer: badly scaled layers at initialisation: {names}")
        log_metrics(trainer, self.signal.metrics(), step=0)

    def _inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """The model input of the first training batch, on the module's device."""
        if self._first_batch is None:
            source = trainer.fit_loop._data_source
            if not source.is_defined():
                return None
            with isolate_rng():  # a shuffling sampler draws from the global RNG
                self._first_batch = next(iter(source.dataloader()))
        device = device_of(pl_module)
        inputs = self.inputs_fn(self._first_batch)
        return map_tensors(lambda t: t.to(device), inputs)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._first_batch = None
