"""Full-batch gradient descent stalls at a saddle point; small-batch SGD escapes.

The start is a strict saddle of the full-batch MSE loss on digits: a one-hidden-layer
tanh network with both weight matrices zero, random hidden biases, and the output bias
at the mean target. There the full-batch gradient vanishes (up to float rounding,
~1e-7) and the Hessian has a negative eigenvalue, while each minibatch's gradient does
not vanish (its mean target differs from the full one). Both runs use the same learning
rate and step budget; the Hessian monitor measures on the *full* training set in both.

A step counts as "at the saddle" when the full-batch gradient norm is below
``--grad-tol`` and the monitor labels the point a saddle (λ_min < −0.01·λ_max). The
run has escaped at the first measurement that is no longer at the saddle and whose
full-batch loss is at least ``--drop`` below the starting loss.

    python examples/saddle_escape.py                 # about a minute on a laptop CPU
    tensorboard --logdir lightning_logs/saddle_escape
"""

from __future__ import annotations

import os
import sys

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

from lightning_landscape import HessianEigenvalueMonitor


class FullBatchLoss:
    """``loss_fn(module, batch)`` that ignores the batch: the loss on the whole train set."""

    def __init__(self, data: common.ImageDataModule) -> None:
        self.data = data

    def __call__(self, module: common.Classifier, batch: object) -> torch.Tensor:
        x, y = (t.to(module.device) for t in self.data.train.tensors)
        return module.loss((x, y))[0]


class LogFullBatchLoss(L.Callback):
    """Log ``full_batch/loss`` every ``every_n_steps`` optimizer steps and at the start."""

    def __init__(self, loss_fn: FullBatchLoss, every_n_steps: int) -> None:
        self.loss_fn, self.every_n_steps = loss_fn, every_n_steps

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with torch.no_grad():
            loss = float(self.loss_fn(pl_module, None))
        for logger in trainer.loggers:
            logger.log_metrics({"full_batch/loss": loss}, step=trainer.global_step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._log(trainer, pl_module)


def place_at_saddle(model: common.Classifier, targets: torch.Tensor, seed: int) -> None:
    """Zero both weight matrices, draw the hidden biases, set the output bias to the mean target."""
    hidden, output = model.net[0], model.net[2]
    with torch.no_grad():
        hidden.weight.zero_()
        output.weight.zero_()
        hidden.bias.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed))
        output.bias.copy_(targets.mean(0))


def steps_to_escape(scalars: common.Scalars, grad_tol: float, drop: float) -> int | None:
    """The first measured step off the saddle with the loss ``drop`` below its start."""
    loss = scalars["full_batch/loss"]
    grad = scalars["landscape/hessian/grad_norm"]
    saddle = scalars["landscape/hessian/saddle"]
    start = loss[min(loss)]
    for step in sorted(grad):
        at_saddle = grad[step] < grad_tol and saddle[step] == 1.0
        if not at_saddle and step in loss and loss[step] <= (1 - drop) * start:
            return step
    return None


def main(argv: list[str] | None = None) -> dict[str, dict[str, float | int | None]]:
    parser = common.parser(__doc__, out="lightning_logs/saddle_escape")
    parser.set_defaults({"data.one_hot": True})
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps of each run")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate of both runs")
    parser.add_argument("--hidden", type=int, default=32, help="hidden units")
    parser.add_argument("--sgd_batch_size", type=int, default=32, help="batch size of SGD")
    parser.add_argument("--every", type=int, default=20, help="measure every this many steps")
    parser.add_argument(
        "--grad_tol", type=float, default=1e-3, help="gradient norm of 'at the saddle'"
    )
    parser.add_argument("--drop", type=float, default=0.1, help="loss drop that counts as escaped")
    config = parser.parse_args(argv)
    steps, every = (20, 5) if config.smoke else (config.steps, config.every)
    runner = common.Runner(parser, config)
    runs = {"gd_full_batch": 0, "sgd": config.sgd_batch_size}
    for name, batch_size in runs.items():
        L.seed_everything(config.seed)
        data = common.ImageDataModule(**{**config.data, "batch_size": batch_size})
        data.setup()
        model = common.Classifier(data.input_dim, (config.hidden,), "tanh", "mse", config.lr)
        place_at_saddle(model, data.train.tensors[1], config.seed)
        loss_fn = FullBatchLoss(data)
        monitor = HessianEigenvalueMonitor(
            every_n_steps=every, measure_at_start=True, loss_fn=loss_fn, tol=1e-3
        )
        runner.fit(
            name,
            model,
            data,
            [monitor, LogFullBatchLoss(loss_fn, every)],
            steps=steps,
        )
    if not runner.is_main:
        return {}
    verdict = {}
    for name, log_dir in runner.log_dirs.items():
        scalars = common.read_scalars(log_dir)
        escaped = steps_to_escape(scalars, config.grad_tol, config.drop)
        verdict[name] = {
            "batch size": runs[name] or "full",
            "grad norm at start": scalars["landscape/hessian/grad_norm"][0],
            "λ_min at start": scalars["landscape/hessian/lambda_min"][0],
            "steps to escape": escaped,
            "final loss": common.last(scalars, "full_batch/loss"),
        }
    shown = {
        name: {**row, "steps to escape": f"> {steps}"} if row["steps to escape"] is None else row
        for name, row in verdict.items()
    }
    runner.conclude("Saddle escape (same learning rate and step budget)", "run", shown)
    return verdict


if __name__ == "__main__":
    main()
