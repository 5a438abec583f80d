"""The loss a monitor measures: the user's ``loss_fn`` or the module's ``training_step``,
and the undoing of what re-running it does to the module."""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections import deque
from collections.abc import (
    Callable,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
    MutableSequence,
    MutableSet,
)
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers.logger import DummyLogger
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics import Metric

from lightning_landscape._context import MODULE_INTERNALS, held_attributes
from lightning_landscape._params import real_view

LossFn = Callable[[nn.Module, Any], Tensor]


@contextlib.contextmanager
def muted_logging(module: pl.LightningModule) -> Iterator[None]:
    """Turn ``self.log``, ``self.log_dict`` and ``self.print`` into no-ops, and the
    Trainer's loggers into ones that write nothing, while the measurement runs.

    A ``self.logger.experiment.add_image(...)`` at ``batch_idx == 0`` would otherwise write
    the probe at every measurement, and a landscape slice print hundreds of lines.
    """
    trainer = module._trainer if isinstance(module, pl.LightningModule) else None
    loggers = trainer.loggers if trainer is not None else []
    module.log = _ignore  # type: ignore[method-assign]
    module.log_dict = _ignore  # type: ignore[method-assign]
    module.print = _ignore  # type: ignore[method-assign]
    if trainer is not None and loggers:
        trainer.loggers = [_MutedLogger(logger) for logger in loggers]
    try:
        yield
    finally:
        del module.log, module.log_dict, module.print  # back to the class's methods
        if trainer is not None and loggers:
            trainer.loggers = loggers


class _MutedLogger(DummyLogger):
    """Lightning's ``DummyLogger`` (what its tuner and ``fast_dev_run`` log to: every call a
    no-op, ``experiment`` included) that still tells where ``logger`` writes, for a
    ``training_step`` that builds paths from ``self.logger.log_dir``."""

    def __init__(self, logger: Logger) -> None:
        super().__init__()
        self._logger = logger

    @property
    def name(self) -> str | None:
        return self._logger.name

    @property
    def version(self) -> int | str | None:
        return self._logger.version

    @property
    def save_dir(self) -> str | None:
        return self._logger.save_dir

    @property
    def root_dir(self) -> str | None:
        return self._logger.root_dir

    @property
    def log_dir(self) -> str | None:
        # A logger without one raises AttributeError: DummyLogger's no-op method answers.
        return self._logger.log_dir


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def metric_states_kept(module: nn.Module) -> Iterator[None]:
    """Undo what re-running ``training_step`` does to the tensor states of the module's
    torchmetrics metrics, which ``update`` adds into in place (:func:`attributes_kept`
    puts back their list states and counters).

    A ``self.train_acc(logits, y)`` in ``training_step`` would otherwise count the probe
    batches, once per forward pass of a measurement, in the accuracy the user logs.
    """
    saved = [
        (metric, name, value.clone())
        for metric in module.modules()
        # Not isinstance: Metric is an ABC, whose first check of a class walks every
        # torchmetrics class (0.2 s, paid again after any ABC registration).
        if Metric in type(metric).__mro__
        for name, value in metric.metric_state.items()
        if isinstance(value, Tensor)
    ]
    try:
        yield
    finally:
        for metric, name, value in saved:
            setattr(metric, name, value)


@contextlib.contextmanager
def attributes_kept(module: nn.Module) -> Iterator[None]:
    """Undo what re-running ``training_step`` does to the attributes of ``module`` and its
    submodules.

    Outputs appended to a list for ``on_train_epoch_end`` (Lightning's recipe), a counter,
    a tensor a forward hook assigns (the masked weight of torch's pruning, by which
    Lightning's ``ModelPruning`` ranks its next mask) are put back as they were. Lists,
    deques, dicts and sets (any mutable sequence, mapping or set), at any depth, get their
    items back in place, so references the user holds stay valid; other values are
    assigned back; attributes the passes added are removed. The tensors they hold (a
    running sum ``self.loss_sum += loss``, per-class tallies) get their values back;
    parameters and buffers are kept still elsewhere (see :class:`ParameterWrites`).
    """
    saved = [
        (prefix, m, {n: v for n, v in vars(m).items() if n not in MODULE_INTERNALS})
        for prefix, m in module.named_modules()
    ]
    contents = _Contents(
        (
            (value, f"{prefix}.{name}" if prefix else name, _NO_KEY)
            for prefix, _, attributes in saved
            for name, value in attributes.items()
        ),
        kept={id(t) for t in (*module.parameters(), *module.buffers())},
    )
    try:
        yield
    finally:
        for _, m, snapshot in saved:
            attributes = vars(m)
            for name in attributes.keys() - snapshot.keys() - MODULE_INTERNALS:
                del attributes[name]
            attributes.update(snapshot)
        contents.put_back()


# Elements of the tensors in attributes copied at every measurement, shallowest first,
# so writes into them can be undone; those beyond (a feature queue) are only watched.
COPY_BUDGET = 1 << 20
# A container of more items gets them back but is not looked into: it holds data (a
# dataset kept as a list), not state, and walking it would cost more than a measurement.
LOOKED_INTO = 1024
_NO_KEY = object()  # an attribute's own: no container key follows its name


class _Contents:
    """The items of the mutable containers that attributes hold, at any depth, and the
    values of the tensors in them, as they were; :meth:`put_back` restores them.

    Args:
        roots: ``(value, name, _NO_KEY)`` of each attribute.
        kept: ids of the tensors kept still elsewhere (parameters and buffers).
    """

    def __init__(self, roots: Iterable[tuple[Any, str, Any]], kept: set[int]) -> None:
        self._items: list[tuple[Any, list[Any]]] = []
        self._tensors: list[tuple[Tensor, int, Tensor]] = []
        self._watched: list[tuple[str, Tensor, int]] = []
        seen, budget = set(kept), COPY_BUDGET
        # Breadth first, so counters held as attributes come first. An item's path (its
        # container's and its key) is spelled out only when needed: lists can be long.
        queue = deque(roots)
        while queue:
            value, parent, key = queue.popleft()
            if id(value) in seen:
                continue
            if isinstance(value, Tensor):
                seen.add(id(value))
                if value.is_inference():  # cannot be written outside inference mode
                    continue
                if value.numel() <= budget:
                    budget -= value.numel()
                    self._tensors.append((value, value._version, value.detach().clone()))
                else:
                    self._watched.append((_path(parent, key), value, value._version))
                continue
            children = self._remember(value)
            if children is not None:
                seen.add(id(value))
                path = _path(parent, key)
                queue.extend((item, path, item_key) for item_key, item in children)

    def _remember(self, value: Any) -> Iterable[tuple[Any, Any]] | None:
        """The ``(key, item)`` pairs ``value`` holds, its items remembered if it is mutable;
        ``None`` for what holds nothing to restore or is not looked into."""
        if isinstance(value, (MutableSequence, MutableSet)):  # a list, a deque of recent losses
            items = list(value)
            self._items.append((value, items))
            pairs: Iterable[tuple[Any, Any]] = enumerate(items)
        elif isinstance(value, MutableMapping):
            pairs = list(value.items())
            self._items.append((value, pairs))
        elif isinstance(value, tuple):
            pairs = enumerate(value)
        else:
            return None
        return pairs if len(value) <= LOOKED_INTO else None

    def put_back(self) -> None:
        """Give every container its items back and every copied tensor its values; warn
        about a watched tensor that was written."""
        for container, items in self._items:
            _refill(container, items)
        for tensor, version, value in self._tensors:
            if tensor._version != version:
                with torch.no_grad():
                    tensor.copy_(value)
        written = [path for path, tensor, version in self._watched if tensor._version != version]
        if written:
            warnings.warn(
                f"a measurement re-ran training_step, which wrote into {written} in place: "
                f"past {COPY_BUDGET} elements, tensors held as plain attributes are not "
                "copied at every measurement, so the run has changed. Register them as "
                "buffers (`self.register_buffer(name, tensor, persistent=False)`), which "
                "measurements leave alone.",
                stacklevel=3,
            )


def _path(parent: str, key: Any) -> str:
    return parent if key is _NO_KEY else f"{parent}[{key!r}]"


def _refill(container: Any, items: list[Any]) -> None:
    """Give a mutable container back its items, with the methods its ABC guarantees."""
    container.clear()
    if isinstance(container, MutableSequence):
        container.extend(items)
    elif isinstance(container, MutableMapping):
        container.update(items)
    else:
        for item in items:
            container.add(item)


@contextlib.contextmanager
def training_state_kept(trainer: pl.Trainer, module: nn.Module) -> Iterator[None]:
    """Undo what re-running ``training_step`` does to the training around the module.

    A learning-rate schedule stepped by hand there (``self.schedule.step()``), a rate set
    there, or a stop asked for once a batch's loss is below a target
    (``self.trainer.should_stop = True``) would otherwise be stepped, set or asked for by
    the probe's passes. The optimisers' hyperparameters, the schedulers' states (the
    Trainer's and those the modules hold) and the stop request come back as they were.
    """
    schedulers = {id(config.scheduler): config.scheduler for config in trainer.lr_scheduler_configs}
    schedulers.update((id(s), s) for s in held_attributes(module, LRScheduler))
    # state_dict() is a fresh dict; a deep copy could copy what a lambda's object holds
    scheduler_states = [(s, s.state_dict()) for s in schedulers.values()]
    hyperparameters = [
        (group, {key: _copied(value) for key, value in group.items() if key != "params"})
        for optimizer in trainer.optimizers
        for group in optimizer.param_groups
    ]
    should_stop = trainer.should_stop
    try:
        yield
    finally:
        for scheduler, state in scheduler_states:
            scheduler.load_state_dict(state)
        for group, saved in hyperparameters:
            for key, value in saved.items():
                if isinstance(group.get(key), Tensor):  # a tensor rate (capturable Adam)
                    group[key].copy_(value)
                else:
                    group[key] = value
        trainer.should_stop = should_stop


def _copied(value: Any) -> Any:
    return value.clone() if isinstance(value, Tensor) else value


class ParameterWrites:
    """The parameters that the code around the loss writes in place, kept still while a
    measurement re-runs that code.

    A ``training_step`` that updates an EMA teacher in place (``t.mul_(m).add_(s, ...)``,
    ``torch._foreach_lerp_``) would otherwise move the teacher once per forward pass of a
    measurement: the user's run would change, and the passes of one measurement would
    see different losses. Writes show in the parameters' version counters, which the
    tensors a measurement swaps in share with them (``Tensor.detach``): the training steps
    are watched that way, copying nothing. Writes through ``.data`` (``t.data.mul_(m)``)
    leave the counters alone, so a measurement also compares each parameter's sum and norm
    before and after it (a pass over the weights). Only the parameters found written are
    copied, once per measurement.
    """

    def __init__(self) -> None:
        #: Names of the parameters found written.
        self.names: set[str] = set()
        self._params: dict[str, Tensor] = {}
        self._saved: dict[str, Tensor] = {}

    def track(self, module: nn.Module) -> None:
        """Watch the parameters of ``module`` (once its model is built); none written yet."""
        self._params = dict(module.named_parameters())
        self.names = set()

    def versions(self) -> dict[str, int]:
        """The parameters' version counters now, for a later :meth:`find`."""
        return {name: p._version for name, p in self._params.items()}

    def fingerprints(self) -> Tensor:
        """Each parameter's sum and norm (float64), for a later :meth:`find`."""
        if not self._params:
            return torch.empty(0, 2, dtype=torch.float64)
        device = next(iter(self._params.values())).device
        return torch.stack([_fingerprint(p).to(device) for p in self._params.values()])

    def find(self, versions: dict[str, int], fingerprints: Tensor | None = None) -> set[str]:
        """Add the parameters written since ``versions`` (and ``fingerprints``) were taken;
        return the new ones."""
        written = {name for name, p in self._params.items() if p._version != versions[name]}
        if fingerprints is not None:
            now = self.fingerprints()
            moved = ((now != fingerprints) & ~(now.isnan() & fingerprints.isnan())).any(1)
            written |= {name for name, m in zip(self._params, moved.tolist()) if m}
        new = written - self.names
        self.names |= new
        return new

    @contextlib.contextmanager
    def kept(self) -> Iterator[None]:
        """Copy the parameters known to be written; every loss evaluation of a
        :meth:`guarded` function starts from that copy, and the exit restores it."""
        self._saved = {name: self._params[name].detach().clone() for name in self.names}
        try:
            yield
        finally:
            self._restore()
            self._saved = {}

    def guarded(self, loss_fn: LossFn) -> LossFn:
        """``loss_fn``, started from the copy :meth:`kept` holds."""

        @functools.wraps(loss_fn)  # its globals stay reachable (see held_generators)
        def loss(module: nn.Module, batch: Any) -> Tensor:
            self._restore()
            return loss_fn(module, batch)

        return loss

    def _restore(self) -> None:
        for name, value in self._saved.items():
            param = self._params[name]
            # Only what moved: a copy bumps the version counter, which a graph still held
            # by the measurement checks.
            if not torch.equal(param, value):
                with torch.no_grad():
                    param.copy_(value)


def _fingerprint(param: Tensor) -> Tensor:
    """A parameter's sum and norm in float64."""
    values = real_view(param.detach())
    if not values.is_floating_point():  # a counter or an index kept as a parameter
        values = values.to(torch.float64)
    return torch.stack(
        [values.sum(dtype=torch.float64), torch.linalg.vector_norm(values, dtype=torch.float64)]
    )


def training_step_loss(module: nn.Module, batch: Any) -> Tensor:
    """The loss ``training_step(batch, 0)`` returns (a tensor, or ``out["loss"]``), unlogged.

    A ``training_step(self, batch)`` without the batch index is called as Lightning calls it.
    """
    step = module.training_step
    args = (batch, 0) if is_param_in_hook_signature(step, "batch_idx", min_args=2) else (batch,)
    with muted_logging(module):
        out = step(*args)
    if isinstance(out, Mapping):
        out = out.get("loss")
    if not isinstance(out, Tensor):
        raise TypeError(
            "`training_step` did not return a loss tensor (or a dict with 'loss'): "
            "pass `loss_fn(module, batch)` to the monitor"
        )
    return out


def resolve_loss_fn(module: pl.LightningModule, loss_fn: LossFn | None) -> LossFn:
    """Return ``loss_fn``, or the training-step loss when the module allows it.

    Raises:
        ValueError: for a module with manual optimisation and no ``loss_fn``: its
            ``training_step`` steps the optimisers, so it cannot be re-run to measure.
    """
    if loss_fn is not None:
        return loss_fn
    if not module.automatic_optimization:
        raise ValueError(
            f"{type(module).__name__} uses manual optimization, so its training_step cannot be "
            "re-run for a measurement: pass `loss_fn(module, batch)` to the monitor"
        )
    return training_step_loss
