"""What every landscape monitor shares: when to measure, on what data, where the numbers go."""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Iterator
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import move_data_to_device, rank_zero_warn
from lightning.pytorch.utilities.memory import garbage_collection_cuda, is_oom_error
from lightning.pytorch.utilities.seed import isolate_rng

from lightning_landscape._batches import BatchSizeFn
from lightning_landscape._context import Mode
from lightning_landscape._distributed import (
    distributed_active,
    end_process_group_at_exit,
    failing_together,
)
from lightning_landscape._params import ParamFilter, check_matches, check_params, real_view
from lightning_landscape._validation import (
    check_bool,
    check_callable,
    check_choice,
    check_int,
    check_name,
)
from lightning_landscape.callbacks._logging import (
    Layout,
    log_metrics,
    logger_step,
    merge_layouts,
    publish,
    write_layout,
)
from lightning_landscape.callbacks._loss import (
    LossFn,
    ParameterWrites,
    attributes_kept,
    metric_states_kept,
    resolve_loss_fn,
    training_state_kept,
)
from lightning_landscape.callbacks._probe import (
    CurrentBatch,
    detached_copy,
    load_probe,
    probe_indices,
    probe_misfit,
)
from lightning_landscape.curvature import Batches, HessianOperator

Probe = Literal["fixed", "current"]

# Strategies that shard parameters: a measurement on the local module would be wrong.
_SHARDED = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)

# A monitor whose measurements take more than this share of the rest of the run, and
# more than these seconds in all (a short demo may measure as often as it likes), says so.
_COSTLY = 0.25
_COSTLY_AFTER_SECONDS = 10.0


class LandscapeCallback(Callback):
    """What every callback of the package shares: a TensorBoard layout, one-time warnings,
    and under DDP a process group destroyed before the interpreter finalises."""

    def __init__(self) -> None:
        super().__init__()
        self._warned: set[str] = set()

    def layout(self) -> Layout:
        """TensorBoard custom-scalars charts for this callback's metrics."""
        return {}

    @property
    def label(self) -> str:
        """How warnings name this callback."""
        return type(self).__name__

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if distributed_active():
            end_process_group_at_exit()
        ours = [cb for cb in trainer.callbacks if isinstance(cb, LandscapeCallback)]
        if ours[0] is self:  # one layout per writer, gathered from every callback of ours
            write_layout(trainer, merge_layouts(cb.titled_layout() for cb in ours))

    def titled_layout(self) -> Layout:
        """:meth:`layout`, with chart titles that tell this callback from others of its kind."""
        return self.layout()

    @contextlib.contextmanager
    def _failure_warned(self, step: int) -> Iterator[None]:
        """Turn any error of an observation into one warning per kind: the user's run goes on."""
        try:
            yield
        except Exception as err:  # noqa: BLE001  (a full GPU, an op we did not foresee)
            self._warn_once(type(err).__name__, f"skipped the measurement at step {step}: {err}")
            # The failed pass's tensors (the memory it ran out of, say) go now, even those
            # a frame holding its own error keeps in a cycle with the traceback.
            traceback.clear_frames(err.__traceback__)
            if is_oom_error(err):
                garbage_collection_cuda()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(f"{self.label} {message} (warned once)")


class LandscapeMonitor(LandscapeCallback):
    """Base of the monitors: cadence, probe data, failure handling and logging.

    Subclasses implement :meth:`measure` (and :meth:`layout` for TensorBoard charts); the
    base decides when it runs, hands it the probe batches, isolates the RNG streams, undoes
    what re-running the loss does to the module (its attributes, the parameters
    ``training_step`` writes in place) and to the training around it (schedules stepped and
    stops asked for there), turns a failing measurement into one warning and a skipped
    point (the same decision on every rank), and logs the returned metrics at the step of
    the Trainer's loggers, where the module's own ``self.log`` puts its values (the global
    step, unless a batch steps several optimisers).

    Args:
        every_n_steps: measure every this many optimizer steps, at the first batch end at or
            past each multiple (``None``: never by steps).
        every_n_epochs: measure at the end of every this many epochs (``None``: never).
        measure_at_start: also measure before the first optimizer step.
        measure_at_end: also measure when training ends.
        probe: ``"fixed"`` measures on batches drawn once from the train set and kept,
            so curves are comparable over time (each DDP rank keeps its own shard);
            ``"current"`` on the batch just trained on, as the loader gave it (a copy
            taken before ``training_step`` once a step is seen writing into its batch,
            and before every step for a batch type whose writes cannot be seen).
        probe_batches: number of fixed probe batches (of the train loader's batch size).
        loss_fn: ``loss_fn(module, batch)`` returning the scalar loss; by default the
            module's ``training_step(batch, 0)`` with logging muted.
        seed: seed of the probe draw, dropout masks and random start vectors.
        name: names this monitor, to run several of its kind in one Trainer (e.g. on
            different ``params``): its metrics then go under ``<metric_prefix>/<name>/``.
    """

    #: Where this monitor's metrics live (a named instance adds ``/<name>``); its cost is
    #: logged as ``<metric_prefix>/seconds``.
    metric_prefix = "landscape"

    def __init__(
        self,
        every_n_steps: int | None = 300,
        every_n_epochs: int | None = None,
        measure_at_start: bool = False,
        measure_at_end: bool = True,
        probe: Probe = "fixed",
        probe_batches: int = 1,
        loss_fn: LossFn | None = None,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__()
        for arg, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None:
                check_int(arg, value, minimum=1)
        check_choice("probe", probe, ("fixed", "current"))
        check_int("probe_batches", probe_batches, minimum=1)
        check_int("seed", seed, minimum=0)
        check_callable("loss_fn", loss_fn, "loss_fn(module, batch)")
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.measure_at_start = check_bool("measure_at_start", measure_at_start)
        self.measure_at_end = check_bool("measure_at_end", measure_at_end)
        self.probe = probe
        self.probe_batches = probe_batches
        self.seed = seed
        self.name = check_name("name", name)
        if name is not None:  # its own metrics, charts, figures and checkpoint entry
            self.metric_prefix = f"{type(self).metric_prefix}/{name}"
        self._user_loss_fn = loss_fn
        self._loss_fn: LossFn | None = None
        self._writes = ParameterWrites()
        self._step_versions: dict[str, int] | None = None
        self._probe_indices: list[list[list[int]]] | None = None  # by rank
        self._probe_data: list[Any] = []
        self._current = CurrentBatch()
        self._last_step = -1  # the loggers' step of the running or last measurement
        self._previous_step = 0  # the global step at the last batch end (or the fit's start)
        #: The metrics of the last measurement, kept across a resume.
        self.last_values: dict[str, float] = {}
        self._fit_started = 0.0
        self._measured: list[float] = []  # seconds of each measurement of this fit

    @property
    def label(self) -> str:
        return f"{super().label}({self.name})" if self.name else super().label

    @property
    def state_key(self) -> str:
        # Lightning files each callback's checkpointed state under this key.
        return self._generate_state_key(name=self.name) if self.name else super().state_key

    def titled_layout(self) -> Layout:
        layout = super().titled_layout()
        if not self.name:
            return layout
        return {
            category: {f"{title} ({self.name})": chart for title, chart in charts.items()}
            for category, charts in layout.items()
        }

    # ------------------------------------------------------------------ to override
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any]
    ) -> dict[str, float]:
        """Take the measurement on ``batches``; return metrics named ``landscape/...``."""
        raise NotImplementedError

    def on_measured(self, trainer: pl.Trainer, step: int) -> None:
        """Log what is not a scalar (figures, histograms): called once every rank succeeded."""

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, _SHARDED):
            raise ValueError(
                f"{type(self).__name__} does not support {type(trainer.strategy).__name__}: it shards "
                "the parameters, so a measurement on one rank's module would be wrong"
            )
        self._loss_fn = self._writes.guarded(resolve_loss_fn(pl_module, self._user_loss_fn))
        # A fit starts from an empty state (a monitor may serve several); resuming restores
        # the checkpointed part after this hook.
        self.load_state_dict({"last_step": -1})
        self._probe_data, self._current = [], CurrentBatch()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._previous_step = trainer.global_step
        self._writes.track(pl_module)
        self._fit_started, self._measured = time.perf_counter(), []
        if self.probe == "fixed":
            indices = self._probe_indices
            misfit = probe_misfit(trainer, indices) if indices is not None else None
            if misfit is not None:
                rank_zero_warn(
                    f"{self.label}'s checkpointed probe {misfit}: it draws a new "
                    "probe, so its curves may jump here"
                )
                self._probe_indices = None
            if self._probe_indices is None:
                self._probe_indices = probe_indices(trainer, self.probe_batches, self.seed)
            if self._probe_indices is not None:
                self._probe_data = load_probe(
                    trainer, self._probe_indices[trainer.global_rank], self.seed
                )
        # Resumed: the last values stand until the next measurement, so a ModelCheckpoint
        # or EarlyStopping monitoring one finds it at once.
        publish(trainer, self.last_values)
        if self.measure_at_start and trainer.global_step == 0:
            self._run(trainer, pl_module, logger_step(trainer))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_versions = self._writes.versions()
        # Batches as drawn: training_step may write into them.
        if self.probe == "current":
            self._current.before_step(batch)
        elif self._probe_indices is None and len(self._probe_data) < self.probe_batches:
            self._probe_data.append(detached_copy(batch))  # iterable data: keep live batches

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        # What training_step wrote in place (an EMA teacher) is kept still by every
        # measurement that re-runs it, the first one included.
        if self._step_versions is not None:
            self._writes.find(self._step_versions)
            self._step_versions = None

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.probe == "current":
            self._current.after_step(batch)
        step, previous = trainer.global_step, self._previous_step
        self._previous_step = step
        # The first batch end past each multiple: a batch stepping several optimisers
        # (manual optimisation) counts a step for each, so it may pass one unseen.
        n = self.every_n_steps
        if n is not None and step // n > previous // n:
            self._run(trainer, pl_module, logger_step(trainer, batch_ended=True))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            self.every_n_epochs is not None
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        ):
            self._run(trainer, pl_module, logger_step(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.measure_at_end:
            self._run(trainer, pl_module, logger_step(trainer))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # Lightning's teardown moves the module off the GPU; the probe follows it, so the
        # accelerator's memory is free after fit and the functional API can take the two.
        self._probe_data = move_data_to_device(self._probe_data, torch.device("cpu"))
        self._current = CurrentBatch()  # the last batch trained on

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self._last_step,
            "probe_indices_by_rank": self._probe_indices,
            "last_values": self.last_values,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a checkpointed state; keys left out take their empty values (``setup``
        resets a monitor this way, so subclasses read their own keys with ``get``)."""
        self._last_step = state_dict["last_step"]
        self.last_values = state_dict.get("last_values", {})
        self._probe_indices = state_dict.get("probe_indices_by_rank")

    # ------------------------------------------------------------------ internals
    def _probe_ready(self) -> bool:
        # The same on every rank (each trains as many batches), so all measure or none.
        if self.probe == "current":
            return self._current.seen
        if self._probe_indices is not None:  # drawn at once (fewer if the shard is small)
            return bool(self._probe_data)
        return len(self._probe_data) == self.probe_batches

    def _batches(self, device: torch.device) -> list[Any]:
        if self.probe == "fixed":
            return self._probe_data
        # A rank may lack its current batch (one its step wrote into unseen): every rank
        # raises then, as a rank that skipped the measurement would leave the others
        # waiting in its collectives.
        with failing_together(device):
            return [self._current.batch]

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Measure, and log at ``step`` (the loggers' step, see ``logger_step``)."""
        if step == self._last_step or not self._probe_ready():
            return
        self._last_step = step
        start = time.perf_counter()
        metrics = None
        with self._failure_warned(step):
            batches = self._batches(pl_module.device)
            metrics = self._measure_leaving_the_run(trainer, pl_module, batches, step)
        # Every rank logs, or none does: a failure on one rank skips the point everywhere.
        if not trainer.strategy.reduce_boolean_decision(metrics is not None, all=True):
            if metrics is not None:
                self._warn_once(
                    "peer", f"skipped the measurement at step {step}: it failed on another rank"
                )
            return
        assert metrics is not None
        metrics[f"{self.metric_prefix}/seconds"] = seconds = time.perf_counter() - start
        self._account(seconds)
        log_metrics(trainer, metrics, step)
        self.last_values = metrics
        try:
            self.on_measured(trainer, step)
        except Exception as err:  # noqa: BLE001  (a full disk, a logger that refuses images)
            self._warn_once("figures", f"could not write its figures at step {step}: {err}")
        if not trainer.loggers:
            self._warn_once(
                "no-logger",
                "the Trainer has no logger: values are only in trainer.callback_metrics",
            )

    def _measure_leaving_the_run(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any], step: int
    ) -> dict[str, float] | None:
        """:meth:`measure`, with what re-running the loss does to the module undone; ``None``
        when it wrote parameters no training step showed, as the run has changed then."""
        versions, fingerprints = self._writes.versions(), self._writes.fingerprints()
        with (
            isolate_rng(),
            metric_states_kept(pl_module),
            attributes_kept(pl_module),
            training_state_kept(trainer, pl_module),
            self._writes.kept(),
        ):
            metrics = self.measure(trainer, pl_module, batches)
        written = self._writes.find(versions, fingerprints)
        if not written:
            return metrics
        # not seen in a training step: a loss_fn's own, a first measurement's, or via .data
        self._warn_once(
            "writes",
            f"skipped the measurement at step {step}: its loss function wrote the parameters "
            f"{sorted(written)} in place, so this measurement changed them and saw them move "
            "between its forward passes; later measurements keep them still",
        )
        return None

    def _account(self, seconds: float) -> None:
        """Warn once when measuring costs more than ``_COSTLY`` of the rest of the run (and
        more than ``_COSTLY_AFTER_SECONDS``)."""
        self._measured.append(seconds)
        measuring = sum(self._measured)
        rest = time.perf_counter() - self._fit_started - measuring
        if len(self._measured) >= 2 and measuring > max(_COSTLY * rest, _COSTLY_AFTER_SECONDS):
            self._warn_once(
                "cost",
                f"took {measuring:.1f} s in {len(self._measured)} measurements against "
                f"{rest:.1f} s for the rest of the run: measure less often "
                "(every_n_steps, every_n_epochs) to spare the training time",
            )


def measurement_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """float32 for half-precision weights (``16-true``); the weights' own dtype otherwise
    (a complex weight's real one)."""
    dtype = real_view(next(module.parameters()).detach()).dtype
    return None if dtype in (torch.float32, torch.float64) else torch.float32


class ProbeLossMonitor(LandscapeMonitor):
    """A monitor that measures the probe loss around the weights through a ``HessianOperator``.

    The operator gives Hessian products and the loss and gradient at shifted weights, over
    the parameters selected by ``params``, in the chosen ``mode``.
    """

    def _set_probe_loss_args(
        self, params: ParamFilter, mode: Mode, batch_size_fn: BatchSizeFn | None
    ) -> None:
        check_params(params)
        check_choice("mode", mode, ("train", "eval"))
        self.params = params
        self.mode: Mode = mode
        self.batch_size_fn = check_callable("batch_size_fn", batch_size_fn, "batch_size_fn(batch)")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A typo in `params` fails now, not as skipped measurements from step 300 on (the
        # model exists only once training starts).
        try:
            check_matches(pl_module, self.params)
        except ValueError as err:
            raise ValueError(f"{self.label}: {err}") from None
        super().on_train_start(trainer, pl_module)

    @property
    def _forward_mode(self) -> Mode | None:
        # Lightning trains each submodule in the mode the user left it in (a frozen
        # BatchNorm stays in eval), so "train" measures the modules as they are.
        return None if self.mode == "train" else "eval"

    def _operator(
        self, pl_module: pl.LightningModule, batches: list[Any], distributed: bool | None = None
    ) -> HessianOperator:
        assert self._loss_fn is not None
        return HessianOperator(
            pl_module,
            self._loss_fn,
            Batches(batches),  # the probe batches may be bare tensors
            self.params,
            self._forward_mode,
            measurement_dtype(pl_module),
            batch_size_fn=self.batch_size_fn,
            seed=self.seed,
            distributed=distributed,
        )
