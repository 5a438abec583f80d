"""The conditions every forward pass of a measurement runs under."""

from __future__ import annotations

import contextlib
import functools
import inspect
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.module import register_module_forward_hook

from lightning_landscape._batches import tensors_in
from lightning_landscape._composites import composite_kernels
from lightning_landscape._spectral_norm import exact_spectral_norms
from lightning_landscape._sync_batch_norm import differentiable_sync_batch_norm

Mode = Literal["train", "eval"]


def device_of(model: nn.Module) -> torch.device:
    """Where ``model`` computes, so where its dropout draws from (its first parameter's device)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextlib.contextmanager
def module_mode(model: nn.Module, mode: Mode | None) -> Iterator[None]:
    """Put ``model`` in train or eval mode (``None``: leave it) and restore every
    submodule's own flag after."""
    flags = [(module, module.training) for module in model.modules()]
    if mode is not None:
        model.train(mode == "train")
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def forked_rng(device: torch.device, seed: int | None) -> Iterator[None]:
    """Seed the RNGs a forward pass may draw from with ``seed``: torch's on the CPU and on
    ``device``, numpy's and Python's; restore them all after.

    Dropout then draws the same masks every time a measurement re-runs the forward pass, as
    does an augmentation drawn in the loss (mixup's ``np.random.beta``), and the user's RNG
    streams are left exactly where they were. ``seed=None`` only forks them.
    """
    accelerator = [] if device.type == "cpu" else [device]
    device_type = "cuda" if device.type == "cpu" else device.type
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=accelerator, device_type=device_type):
        if seed is not None:
            torch.default_generator.manual_seed(seed)
            if device.type == "cuda":
                index = device.index if device.index is not None else torch.cuda.current_device()
                torch.cuda.default_generators[index].manual_seed(seed)
            elif accelerator:
                getattr(torch, device.type).manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _autocast_disabled(device: torch.device) -> contextlib.AbstractContextManager:
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()


def compiled_run_eagerly() -> contextlib.AbstractContextManager:
    """Run submodules wrapped in ``torch.compile`` eagerly in the block: a pass of ours
    (with hooks, in another grad mode, on another batch shape) would otherwise compile
    graphs of its own and use up the user's recompile limit."""
    return torch.compiler.set_stance("force_eager")


@contextlib.contextmanager
def exact_numerics(device: torch.device) -> Iterator[None]:
    """Gradients on, autocast off, attention through the math kernel, no compiled code.

    Gradients are enabled even inside ``torch.no_grad()``. Autocast is off so curvature is
    measured in the parameters' precision under mixed-precision training (it must be off
    for the double backward too, not only the forward pass). The math kernel of
    ``scaled_dot_product_attention`` is the only one with a double backward. Submodules
    wrapped in ``torch.compile`` run eagerly: a compiled graph has no double backward, and
    a probe of another batch shape would make the user's graphs recompile.

    Args:
        device: the device the parameters live on.
    """
    with (
        torch.enable_grad(),
        _autocast_disabled(device),
        sdpa_kernel(SDPBackend.MATH),
        compiled_run_eagerly(),
    ):
        yield


HALF_PRECISION = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def half_precision_modules() -> Iterator[dict[nn.Module, torch.dtype]]:
    """Record the modules called in the block whose output holds a float16 or bfloat16
    tensor, each with that dtype.

    :func:`exact_numerics` turns off an autocast entered around the measurement, not one
    the user's ``training_step``, ``forward`` or loss enters itself; such a pass computes
    its products at half precision. Outputs show it; the hook only reads them.
    """
    found: dict[nn.Module, torch.dtype] = {}

    def record(module: nn.Module, args: Any, output: Any) -> None:
        if module not in found:
            dtype = next((t.dtype for t in tensors_in(output) if t.dtype in HALF_PRECISION), None)
            if dtype is not None:
                found[module] = dtype

    handle = register_module_forward_hook(record)
    try:
        yield found
    finally:
        handle.remove()


def _no_cudnn_for_recurrent(
    model: nn.Module, device: torch.device
) -> contextlib.AbstractContextManager:
    # cuDNN's LSTM/GRU/RNN kernels have no double backward; PyTorch's own ones do. Off
    # for the whole forward pass only when the model has a recurrent layer.
    if device.type == "cuda" and any(isinstance(m, nn.RNNBase) for m in model.modules()):
        return torch.backends.cudnn.flags(enabled=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _plain_embedding_gradients(model: nn.Module) -> Iterator[None]:
    # Two options of the embedding layers change the gradient they give, not the loss. A
    # sparse one (sparse=True, for SparseAdam) cannot be flattened into the operator's
    # vectors. One scaled by each row's frequency in the batch (scale_grad_by_freq=True)
    # is no loss's gradient, and its double backward makes products H·D, not symmetric.
    # Measurements take the loss's own dense gradient.
    changed = [
        (m, m.sparse, m.scale_grad_by_freq)
        for m in model.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and (m.sparse or m.scale_grad_by_freq)
    ]
    for module, _, _ in changed:
        module.sparse = module.scale_grad_by_freq = False
    try:
        yield
    finally:
        for module, sparse, scaled in changed:
            module.sparse, module.scale_grad_by_freq = sparse, scaled


# What nn.Module keeps in its own __dict__ (hooks, parameter and submodule tables).
MODULE_INTERNALS = frozenset(vars(nn.Module()))

# The random generators a module may hold as attributes: how to read and write their state.
_GENERATORS: dict[type, tuple[Callable[[Any], Any], Callable[[Any, Any], None]]] = {
    torch.Generator: (torch.Generator.get_state, torch.Generator.set_state),
    np.random.RandomState: (np.random.RandomState.get_state, np.random.RandomState.set_state),
    np.random.Generator: (
        lambda generator: generator.bit_generator.state,
        lambda generator, state: setattr(generator.bit_generator, "state", state),
    ),
    random.Random: (random.Random.getstate, random.Random.setstate),
}
_GENERATOR_TYPES = tuple(_GENERATORS)


def held_attributes(model: nn.Module, kinds: type | tuple[type, ...]) -> list[Any]:
    """The objects of ``kinds`` that the modules of ``model`` hold as attributes, each
    once (e.g. learning-rate schedulers)."""
    found = {
        id(value): value
        for module in model.modules()
        for name, value in vars(module).items()
        if name not in MODULE_INTERNALS and isinstance(value, kinds)
    }
    return list(found.values())


def held_generators(model: nn.Module, loss_fn: Callable[..., Any] | None = None) -> list[Any]:
    """The random generators the modules of ``model`` hold as attributes
    (``self.noise = torch.Generator()``, numpy's ``default_rng``), and those that their
    code and ``loss_fn`` reach by a global name (``RNG = np.random.default_rng(0)`` at the
    top of a training script)."""
    found = {id(g): g for g in held_attributes(model, _GENERATOR_TYPES)}
    # Exact types: a module's globals are many, and torch.Generator's isinstance check runs
    # Python code; subclasses there are rare (random.SystemRandom has no state to keep).
    for namespace in _code_globals(model, loss_fn):
        found.update((id(v), v) for v in namespace.values() if type(v) in _GENERATORS)
    return list(found.values())


def _code_globals(model: nn.Module, loss_fn: Callable[..., Any] | None) -> list[dict[str, Any]]:
    """The global namespaces of the modules that define the model's classes and the loss."""
    names = {cls.__module__ for module in model.modules() for cls in type(module).__mro__}
    namespaces = [vars(sys.modules[name]) for name in names if name in sys.modules]
    function = inspect.unwrap(loss_fn) if loss_fn is not None else None
    while isinstance(function, functools.partial):
        function = inspect.unwrap(function.func)
    function = getattr(function, "__func__", function)  # a bound method's function
    if hasattr(function, "__globals__"):
        namespaces.append(function.__globals__)
    elif function is not None and type(function).__module__ in sys.modules:  # a callable object
        namespaces.append(vars(sys.modules[type(function).__module__]))
    return namespaces


@contextlib.contextmanager
def _generators_kept(generators: Sequence[Any]) -> Iterator[None]:
    # Each starts the pass where the measurement found it, and is left there.
    saved = [
        (generator, setter, getter(generator))
        for generator in generators
        for kind, (getter, setter) in _GENERATORS.items()
        if isinstance(generator, kind)
    ]
    try:
        yield
    finally:
        for generator, setter, state in saved:
            setter(generator, state)


@contextlib.contextmanager
def measurement_context(
    model: nn.Module,
    mode: Mode | None,
    device: torch.device,
    seed: int,
    generators: Sequence[Any] = (),
    synchronise: bool = False,
) -> Iterator[None]:
    """Run a forward pass of a measurement: :func:`exact_numerics`, a seeded forked RNG,
    ``generators`` left where they were, the requested train/eval mode, embedding layers
    with the loss's own dense gradient, spectral norms by the exact largest singular value
    (:mod:`lightning_landscape._spectral_norm`); kernels whose double backward is wrong or
    missing run as composites (:mod:`lightning_landscape._composites`), ``SyncBatchNorm``
    over a differentiable all-reduce and, on CUDA, recurrent layers without cuDNN.
    Everything is restored on exit.

    Args:
        model: the module whose mode is set.
        mode: ``"train"``, ``"eval"`` or ``None`` (each submodule as it is).
        device: the device the parameters live on.
        seed: seed of the forked RNG.
        generators: the generators the model holds or its code reaches
            (:func:`held_generators`).
        synchronise: whether the measurement sums over processes, so that
            ``SyncBatchNorm`` layers synchronise their statistics.
    """
    with (
        module_mode(model, mode),
        forked_rng(device, seed),
        _generators_kept(generators),
        exact_numerics(device),
        _no_cudnn_for_recurrent(model, device),
        _plain_embedding_gradients(model),
        exact_spectral_norms(model),
        composite_kernels(model),
        differentiable_sync_batch_norm(model, synchronise),
    ):
        yield
