"""The Hessian of a loss as a fixed symmetric linear map over flat parameter vectors."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel

from lightning_landscape._batches import (
    BatchSizeFn,
    as_batch_list,
    at_precision,
    copy_batch,
    sample_count,
    to_device,
)
from lightning_landscape._composites import composites_needed, use_composites
from lightning_landscape._context import (
    Mode,
    exact_numerics,
    half_precision_modules,
    held_generators,
    measurement_context,
)
from lightning_landscape._distributed import (
    all_reduce_sum_or_raise,
    any_process,
    distributed_active,
)
from lightning_landscape._graph import check_twice_differentiable, nodes
from lightning_landscape._params import ParamFilter, real_view, select_parameters
from lightning_landscape._validation import check_choice
from lightning_landscape.errors import (
    NondeterministicLossError,
    NonFiniteError,
    ReducedPrecisionWarning,
)

LossFn = Callable[[nn.Module, Any], Tensor]
# A batch's share of a point evaluation: its weight, its loss and the gradients of its
# weighted loss (None: loss only).
_Term = tuple[float, Tensor, Sequence[Tensor | None] | None]

_SUPPORTED_DTYPES = (torch.float32, torch.float64)


class _LossModule(nn.Module):
    """Lets ``functional_call`` swap the parameters seen by an arbitrary ``loss_fn``."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self._loss_fn(self.model, batch)


class HessianOperator:
    """The Hessian of the mean loss over fixed batches, as a symmetric linear map.

    Vectors are flat tensors of length :attr:`size` that concatenate the selected
    parameters in model order (:meth:`flatten` / :meth:`unflatten` convert). A complex
    parameter spans its real coordinates, ``(re, im)`` pairs as ``torch.view_as_real``
    lays them out: the Hessian is that of the loss over them, the real-valued map that
    gradient descent and Adam step along. Every product
    sees the same map: the same batches, the same dropout masks and random draws (batch
    ``i`` runs with torch's, numpy's and Python's RNGs seeded to ``seed + i`` inside a fork,
    and generators the model holds or its code reaches by a global name start every pass
    where they were, so the user's RNG streams are untouched), and BatchNorm running
    statistics that never move (the forward pass runs on copies of the buffers). A loss
    that still changes between passes at the point (a generator created inside it) raises
    :class:`NondeterministicLossError`. Autocast is off and attention runs through the math
    kernel, which has the double backward the fused kernels lack; an autocast entered
    inside ``loss_fn`` warns with :class:`ReducedPrecisionWarning`.

    With one batch the first-order graph is built once and reused by every product; with
    several, each product runs the batches one after another and frees each graph, so
    memory stays bounded by one batch. Under ``torch.distributed`` each process holds its
    own shard of the batches, products are all-reduced weighted by sample counts, and every
    process holds the result one process would get on the union of the shards.

    It also evaluates the loss and its gradient around the point (:meth:`loss_at`,
    :meth:`loss_and_gradient`) under the same conditions, on shifted copies of the
    parameters: the sharpness measures and landscape slices are built on that.

    Use it as a context manager (or call :meth:`release`) to free the retained graph.

    Args:
        model: the network; a ``DistributedDataParallel`` wrapper is looked through.
        loss_fn: ``loss_fn(model, batch)`` returns the scalar mean loss of the batch.
        batches: one batch, a list of batches or a ``DataLoader`` (all its batches: the
            whole dataset); a list holding a tensor is one ``[inputs, targets]`` batch, so
            pass several bare-tensor batches as ``Batches([x1, x2])``. Tensors are moved
            to the parameters' device.
        params: which parameters span the Hessian: ``None`` for all with
            ``requires_grad``, or regular expressions matched against parameter names.
            Parameters the loss does not use get zero rows.
        mode: run the forward pass in ``"train"`` mode (the curvature the optimiser sees)
            or in ``"eval"`` mode; ``None`` leaves each submodule in its own mode (a frozen
            BatchNorm in eval, the rest training). Every submodule's mode is restored
            afterwards.
        dtype: ``torch.float32`` or ``torch.float64``; defaults to the parameters' dtype
            (a complex one's real dtype). When it differs, parameters, buffers and
            floating-point inputs are cast, complex ones to the complex dtype of that
            precision (the model itself is left as it is).
        batch_size_fn: sample count of a batch, used to weight batches and shards; by
            default the leading dimension of the batch's first tensor.
        seed: seed of the dropout masks and of other random draws in ``loss_fn``.
        distributed: ``None`` all-reduces whenever a process group is initialised;
            ``False`` measures on this process's batches alone.

    Raises:
        TypeError: if ``model`` is not a module or ``loss_fn`` is not callable.
        ValueError: for an unknown ``mode`` or ``dtype``, empty ``batches``, or ``params``
            that select nothing.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Any,
        params: ParamFilter = None,
        mode: Mode | None = "train",
        dtype: torch.dtype | None = None,
        *,
        batch_size_fn: BatchSizeFn | None = None,
        seed: int = 0,
        distributed: bool | None = None,
    ) -> None:
        if isinstance(model, DistributedDataParallel):
            model = model.module  # products are all-reduced here, not by DDP's reducer
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable as loss_fn(model, batch), got {loss_fn!r}")
        if mode is not None:
            check_choice("mode", mode, ("train", "eval"))
        if dtype is not None and dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"`dtype` must be None, torch.float32 or torch.float64, got {dtype}")

        selected = select_parameters(model, params)
        self.model = model
        # A lookup under max_norm rescales the rows it reads in place: passes get copies.
        self._rescaled = {
            id(m.weight)
            for m in model.modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None
        }
        self.mode = mode
        self.param_names: list[str] = [name for name, _ in selected]
        self._params = [p for _, p in selected]
        self._shapes = [real_view(p.detach()).shape for p in self._params]
        self._numels = [shape.numel() for shape in self._shapes]
        self.size: int = sum(self._numels)
        self.device: torch.device = self._params[0].device
        self.dtype: torch.dtype = dtype or real_view(self._params[0].detach()).dtype
        if self.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(
                f"the parameters are {self.dtype}; curvature needs float32 or float64: "
                "pass `dtype=torch.float32`"
            )
        self._leaf_dtypes = [at_precision(p, self.dtype) for p in self._params]
        floating = [
            real_view(t.detach())
            for t in (*model.parameters(), *model.buffers())
            if t.is_floating_point() or t.is_complex()
        ]
        # Cast only on request: a float32 model may keep float64 buffers on purpose.
        self._cast = (
            dtype if dtype is not None and any(t.dtype != dtype for t in floating) else None
        )

        self._wrapper = _LossModule(model, loss_fn)
        self._batches = [to_device(b, self.device, self._cast) for b in as_batch_list(batches)]
        self._seed = seed
        self._generators = held_generators(model, loss_fn)
        self.distributed = distributed_active(distributed)
        # Whether every process holds as many batches, so that their passes run in step.
        self._weights, self._passes_in_step = self._batch_weights(batch_size_fn)

        self._graph: tuple[Tensor, list[Tensor], Sequence[Tensor | None]] | None = None
        self._point: tuple[Tensor, Tensor] | None = None
        self._first_losses: dict[int, Tensor] = {}  # each batch's loss at the point
        self._verified: set[int] = set()  # batches whose loss was seen to repeat
        self.n_matvec = 0
        self._precision_warned = False

    # ------------------------------------------------------------------ vectors
    @property
    def parameters(self) -> list[Tensor]:
        """The parameters the Hessian is taken over, in the order of a flat vector."""
        return list(self._params)

    @property
    def block_sizes(self) -> list[int]:
        """Lengths of the per-parameter blocks of a flat vector, in order."""
        return list(self._numels)

    def flatten(self, tensors: Sequence[Tensor | None]) -> Tensor:
        """Concatenate per-parameter tensors into one vector; ``None`` stands for zeros.

        A complex parameter's tensor may be complex or its real view."""
        out = torch.empty(self.size, dtype=self.dtype, device=self.device)
        for chunk, tensor in zip(out.split(self._numels), tensors):
            if tensor is None:
                chunk.zero_()
            else:
                chunk.copy_(real_view(tensor).reshape(-1))
        return out

    def unflatten(self, vector: Tensor) -> list[Tensor]:
        """Split a vector into views shaped like the selected parameters, a complex one's
        like its real view (``torch.view_as_real``)."""
        return [c.view(s) for c, s in zip(vector.split(self._numels), self._shapes)]

    def _parameter_form(self, vector: Tensor) -> list[Tensor]:
        """Split a vector per parameter, complex where the parameter is (a copy there:
        ``view_as_complex`` wants an even offset, which a chunk may lack)."""
        return [
            torch.complex(chunk[..., 0], chunk[..., 1]) if p.is_complex() else chunk
            for p, chunk in zip(self._params, self.unflatten(vector))
        ]

    # ------------------------------------------------------------------ the point
    @property
    def loss(self) -> Tensor:
        """The mean loss over all batches (and processes), a detached 0-d tensor."""
        return self._first_order()[0]

    @property
    def gradient(self) -> Tensor:
        """The gradient of the mean loss as a flat vector."""
        return self._first_order()[1]

    @property
    def parameters_vector(self) -> Tensor:
        """The selected parameters at the point, as one flat vector (a copy)."""
        return self.flatten([p.detach() for p in self._params])

    def loss_at(self, offset: Tensor) -> Tensor:
        """The mean loss at the point shifted by ``offset`` (same batches, masks, mode).

        The model's own parameters are never written: the shifted values live in copies.

        Raises:
            NonFiniteError: if the loss there is NaN or infinite.
        """
        return self._evaluate(offset, gradient=False)[0]

    def loss_and_gradient(self, offset: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The mean loss and its gradient (flat) at the point shifted by ``offset``."""
        return self._evaluate(offset, gradient=True)

    def _evaluate(self, offset: Tensor | None, *, gradient: bool) -> tuple[Tensor, Tensor]:
        if offset is not None:
            if offset.shape != (self.size,):
                raise ValueError(
                    f"`offset` must have shape ({self.size},), got {tuple(offset.shape)}"
                )
            offset = offset.to(device=self.device, dtype=self.dtype)

        def terms() -> Iterator[_Term]:
            for index, weight in enumerate(self._weights):
                if offset is not None:  # a difference of losses needs the same draws
                    self._verify_repeatable(index)
                if gradient:
                    loss, _, grads = self._differentiate(index, create_graph=False, offset=offset)
                else:
                    loss, grads = self._loss_only(index, offset), None
                yield weight, loss, grads

        return self._reduced(terms, gradient=gradient)

    def _loss_only(self, index: int, offset: Tensor | None) -> Tensor:
        with self._measuring(index):
            return self._forward(index, offset, differentiable=False)[0]

    def _measuring(self, index: int) -> contextlib.AbstractContextManager[None]:
        """The conditions of every pass over batch ``index``."""
        return measurement_context(
            self.model,
            self.mode,
            self.device,
            self._seed + index,
            self._generators,
            synchronise=self.distributed,
        )

    def _verify_repeatable(self, index: int) -> None:
        """Compare a pass at the point with the first one, before batch ``index`` is first
        evaluated away from it (two passes when none ran yet)."""
        if index in self._verified:
            return
        for _ in range(1 if index in self._first_losses else 2):
            self._loss_only(index, None)  # compared in _forward
        self._verified.add(index)

    # ------------------------------------------------------------------ products
    def matvec(self, vector: Tensor) -> Tensor:
        """Return the Hessian-vector product ``H @ vector``.

        Raises:
            ValueError: if ``vector`` does not have shape ``(size,)``.
            NonFiniteError: if the loss, gradient or product is NaN or infinite.
            PeerFailureError: under ``torch.distributed``, if another process failed to
                compute its share (that process raises its own error).
        """
        if vector.shape != (self.size,):
            raise ValueError(f"`vector` must have shape ({self.size},), got {tuple(vector.shape)}")
        vector = vector.to(device=self.device, dtype=self.dtype)
        product = self._summed(lambda: self._local_product(vector))
        # The sum is finite iff every entry is (short of an overflow near 1e38), at 1/30 the cost.
        if not torch.isfinite(product.sum()):
            self._first_order()  # names the loss or gradient if they are the cause (all ranks get here)
            raise NonFiniteError("the Hessian-vector product is not finite")
        self.n_matvec += 1
        return product

    __matmul__ = matvec

    def _local_product(self, vector: Tensor) -> Tensor:
        """This process's share of the product: its batches, weighted."""
        if len(self._batches) == 1:
            _, leaves, grads = self._single_graph()
            return self._product(leaves, grads, vector, retain_graph=True)
        product = torch.zeros(self.size, dtype=self.dtype, device=self.device)
        for index in range(len(self._batches)):
            _, leaves, grads = self._differentiate(index, create_graph=True)
            product.add_(self._product(leaves, grads, vector, retain_graph=False))
        return product

    def _check_repeated(self, index: int, loss: Tensor) -> None:
        """Raise when batch ``index`` gives another loss than at its first pass."""
        first = self._first_losses.setdefault(index, loss)
        # Far above the jitter of nondeterministic kernels (atomic adds, ~1e-7); two noise
        # draws of a test loss landed this close about once in a thousand.
        if first is not loss and not torch.isclose(loss, first, rtol=1e-5, atol=0, equal_nan=True):
            raise NondeterministicLossError(
                f"the loss of probe batch {index} changed between passes at the same weights "
                f"({first.item():.6g}, then {loss.item():.6g}): it draws from a random source "
                "the measurement can neither seed nor hold still, such as a generator created "
                "inside it (`np.random.default_rng()`). Hold the generator on the module or "
                "at the top of the script, where measurements keep it still."
            )

    def _summed(self, local: Callable[[], Tensor]) -> Tensor:
        """``local()``, summed over processes under ``torch.distributed``; a failure of
        ``local()`` on one process raises on every process instead of leaving the others
        waiting in the sum."""
        if not self.distributed:
            return local()
        return all_reduce_sum_or_raise(local, self.device)

    def release(self) -> None:
        """Free the retained first-order graph (it is rebuilt if needed again)."""
        self._graph = None

    def __enter__(self) -> HessianOperator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    # ------------------------------------------------------------------ internals
    def _batch_weights(self, batch_size_fn: BatchSizeFn | None) -> tuple[list[float], bool]:
        """Each batch's share of the mean loss, and whether every process holds as many."""
        if len(self._batches) == 1 and not self.distributed:
            return [1.0], True  # no count needed: custom batch types work without batch_size_fn
        counts: list[int] = []

        def local_totals() -> Tensor:
            counts.extend(sample_count(b, batch_size_fn) for b in self._batches)
            batches = len(counts)
            return torch.tensor(
                [float(sum(counts)), batches, batches**2], dtype=torch.float64, device=self.device
            )

        total, batches, squares = self._summed(local_totals).tolist()
        # Equal counts iff (Σn)² = w·Σn² (Cauchy-Schwarz): every process takes the same decision.
        uneven = self.distributed and batches**2 != dist.get_world_size() * squares
        if uneven and self._synchronises_batch_norm():
            raise ValueError(
                "every process must hold the same number of batches when the model has "
                "SyncBatchNorm layers in training mode: batch i of each process is "
                "normalised together with batch i of the others"
            )
        return [count / total for count in counts], not uneven

    def _synchronises_batch_norm(self) -> bool:
        return self.mode != "eval" and any(
            isinstance(m, nn.SyncBatchNorm) for m in self.model.modules()
        )

    def _forward(
        self, index: int, offset: Tensor | None = None, *, differentiable: bool = True
    ) -> tuple[Tensor, list[Tensor]]:
        """Evaluate the loss of batch ``index`` at leaf copies of the parameters (+ ``offset``).

        With ``differentiable=False`` the parameters are constants (a loss-only evaluation).
        """
        if offset is None:
            leaves = [
                p.detach().to(dtype, copy=id(p) in self._rescaled)
                for p, dtype in zip(self._params, self._leaf_dtypes)
            ]
        else:
            shifts = self._parameter_form(offset)
            leaves = [
                p.detach().to(dtype) + d
                for p, dtype, d in zip(self._params, self._leaf_dtypes, shifts)
            ]
        if differentiable:
            leaves = [leaf.requires_grad_() for leaf in leaves]
        # What each of the model's tensors is replaced by, found by identity.
        substitutes = {id(p): leaf for p, leaf in zip(self._params, leaves)}
        for p in self.model.parameters():
            if id(p) not in substitutes:  # a constant here: no graph, no memory
                substitutes[id(p)] = self._cast_like(p.detach(), copy=id(p) in self._rescaled)
        for b in self.model.buffers():  # copies, so BatchNorm's running statistics never move
            substitutes[id(b)] = self._cast_like(b, copy=True)
        tensors = {name: substitutes[id(t)] for name, t in _slots(self._wrapper)}
        # Each pass gets its own copy of the batch: a loss that writes into it (`x /= 255` on
        # a float batch) would otherwise see it scaled again by every pass.
        batch = copy_batch(self._batches[index])
        # Autograd stays on in a loss-only pass too: with no leaf requiring grad it records
        # nothing, and a loss that differentiates inside (an input-gradient penalty) needs it.
        # The precision a loss runs at is its own: the first pass of each batch shows it,
        # and later passes (every product, with several batches) skip the global hook.
        watched = not self._precision_warned and index not in self._first_losses
        with half_precision_modules() if watched else contextlib.nullcontext({}) as half:
            loss = functional_call(self._wrapper, tensors, (batch,), tie_weights=False)
        if half:
            self._precision_warned = True
            self._warn_half_precision(half)
        loss = _checked_loss(loss, differentiable)
        if offset is None:  # every pass at the point must give the first pass's loss
            self._check_repeated(index, loss.detach())
        return (loss if differentiable else loss.detach()), leaves

    def _warn_half_precision(self, half: Mapping[nn.Module, torch.dtype]) -> None:
        # Output hooks fire as modules finish: the first recorded is the first layer that ran
        # at half precision, before the containers around it.
        modules = [module for module in half if module is not self._wrapper]
        if not modules:  # the loss function's own ops, outside any module of the model
            where, dtype = "its own ops", half[self._wrapper]
        else:
            names = {module: name for name, module in self.model.named_modules()}
            name = f"`{names[modules[0]]}`" if names.get(modules[0]) else "the model"
            where, dtype = f"{name} ({type(modules[0]).__name__})", half[modules[0]]
            if len(modules) > 1:
                where += f" and {len(modules) - 1} more module(s)"
        warnings.warn(
            f"the loss ran {where} in {dtype}: an autocast or a cast inside training_step, "
            "forward or loss_fn, which each measurement re-runs, so its Hessian-vector "
            f"products are computed at that precision, not in {self.dtype}. Leave mixed "
            "precision to the Trainer's `precision` (measurements turn it off) or move the "
            "autocast out of the loss.",
            ReducedPrecisionWarning,
            stacklevel=2,
        )

    def _cast_like(self, tensor: Tensor, *, copy: bool) -> Tensor:
        dtype = tensor.dtype if self._cast is None else at_precision(tensor, self._cast)
        return tensor.to(dtype=dtype, copy=copy)

    def _differentiate(
        self, index: int, *, create_graph: bool, offset: Tensor | None = None
    ) -> tuple[Tensor, list[Tensor], Sequence[Tensor | None]]:
        """Batch ``index``'s loss, its parameter leaves and the gradients of its weighted loss.

        Weighted before differentiating, not after: through a ``SyncBatchNorm`` each
        process's gradient also carries the other processes' losses, each with its weight.
        A pass is built again through composites when it ran a kernel whose double
        backward (when kept for products) or gradient is wrong or missing
        (:mod:`lightning_landscape._composites`). Processes whose passes run in step decide
        that together: a kernel may run on one process only (``cdist`` picks it by the
        number of points), and a pass built again on that one alone would pair its
        forward's collectives with the others' backward.
        """
        with self._measuring(index):
            loss, leaves = self._forward(index, offset)
            graph = list(nodes(loss))  # one walk of the graph for both questions
            if create_graph:
                check_twice_differentiable(graph)
            rebuild = composites_needed(graph, self.model, products=create_graph)
            if self.distributed and self._passes_in_step:
                rebuild = any_process(rebuild, self.device)
            if not rebuild:
                grads = torch.autograd.grad(
                    self._weights[index] * loss,
                    leaves,
                    create_graph=create_graph,
                    allow_unused=True,
                )
                return loss, leaves, grads
            use_composites(self.model)
        del loss, leaves, graph  # the kernel's graph goes before the composite's is built
        return self._differentiate(index, create_graph=create_graph, offset=offset)

    def _single_graph(self) -> tuple[Tensor, list[Tensor], Sequence[Tensor | None]]:
        if self._graph is None:
            self._graph = self._differentiate(0, create_graph=True)
        return self._graph

    def _product(
        self,
        leaves: list[Tensor],
        grads: Sequence[Tensor | None],
        vector: Tensor,
        *,
        retain_graph: bool,
    ) -> Tensor:
        # Gradients that do not depend on any parameter (None, or constant) add nothing.
        pairs = [
            (g, v)
            for g, v in zip(grads, self._parameter_form(vector))
            if g is not None and g.requires_grad
        ]
        if not pairs:
            return torch.zeros(self.size, dtype=self.dtype, device=self.device)
        with exact_numerics(self.device):
            products = torch.autograd.grad(
                [g for g, _ in pairs],
                leaves,
                grad_outputs=[v for _, v in pairs],
                retain_graph=retain_graph,
                allow_unused=True,
            )
        return self.flatten(products)

    def _first_order(self) -> tuple[Tensor, Tensor]:
        if self._point is None:
            if len(self._batches) == 1:  # from the kept graph, no extra pass

                def kept() -> list[_Term]:
                    loss, _, grads = self._single_graph()
                    return [(self._weights[0], loss, grads)]

                self._point = self._reduced(kept, gradient=True)
            else:
                self._point = self.loss_and_gradient()
        return self._point

    def _reduced(
        self, terms: Callable[[], Iterable[_Term]], *, gradient: bool
    ) -> tuple[Tensor, Tensor]:
        """Weighted loss (and gradient) of the ``terms()`` evaluated here, summed over
        processes, checked finite.

        The only collective of a point evaluation, so every process runs the same
        collectives in the same order whatever the number of batches it holds (short of
        ``SyncBatchNorm`` layers, which synchronise batch by batch).
        """
        size = 1 + (self.size if gradient else 0)

        def local() -> Tensor:
            packed = torch.zeros(size, dtype=self.dtype, device=self.device)
            for weight, loss, grads in terms():
                packed[0] += weight * loss.detach()
                if grads is not None:
                    packed[1:] += self.flatten(
                        [g.detach() if g is not None else None for g in grads]
                    )
            return packed

        packed = self._summed(local)
        if not torch.isfinite(packed[0]):
            raise NonFiniteError(f"the loss is not finite ({packed[0].item()})")
        if not torch.isfinite(packed[1:]).all():
            raise NonFiniteError("the gradient is not finite")
        return packed[0], packed[1:]


def _slots(root: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Every place a module holds a parameter or buffer, by name; each module once.

    A weight that two modules share (tied layers) has a place in each, so both see its
    substitute. A module reachable under two names (``self.backbone = self.body``) has its
    places once: ``functional_call`` would swap such a place twice and, restoring in the
    same order, leave the substitute in the user's model (pytorch/pytorch#164759).
    """
    for prefix, module in root.named_modules():
        yield from module.named_parameters(prefix, recurse=False, remove_duplicate=False)
        yield from module.named_buffers(prefix, recurse=False, remove_duplicate=False)


def _checked_loss(loss: Any, differentiable: bool = True) -> Tensor:
    if not isinstance(loss, Tensor):
        raise TypeError(f"`loss_fn` must return a Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"`loss_fn` must return a scalar loss, got shape {tuple(loss.shape)}")
    if differentiable and not loss.requires_grad:
        raise ValueError(
            "the loss returned by `loss_fn` has no grad path to the selected parameters"
        )
    return loss.reshape(())
