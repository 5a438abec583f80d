"""Train a small network on scikit-learn's bundled digits for a few steps, then print the
Hessian's largest and smallest eigenvalues and its trace.

Run: ``python examples/hessian_demo.py`` (needs the ``examples`` extra: scikit-learn).
"""

from __future__ import annotations

import time

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape.curvature import hessian_eigenvalues, hessian_trace


class DigitsClassifier(L.LightningModule):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def digits() -> TensorDataset:
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    return TensorDataset(x, torch.tensor(data.target))


def main() -> None:
    L.seed_everything(0)
    dataset = digits()
    model = DigitsClassifier()
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, DataLoader(dataset, batch_size=64, shuffle=True))

    probe = dataset[:512]  # one fixed batch of 512 digits
    loss_fn = lambda m, batch: F.cross_entropy(m(batch[0]), batch[1])
    start = time.perf_counter()
    eig = hessian_eigenvalues(model, loss_fn, probe, k=3, which="both")
    trace = hessian_trace(model, loss_fn, probe)
    seconds = time.perf_counter() - start
    top, bottom = eig.eigenvalues[:3].tolist(), eig.eigenvalues[3:].tolist()
    print(f"parameters:            {sum(p.numel() for p in model.parameters())}")
    print(f"top-3 eigenvalues:     {', '.join(f'{v:.4f}' for v in top)}")
    print(f"bottom-3 eigenvalues:  {', '.join(f'{v:.4f}' for v in bottom)}")
    print(f"|λ_min| / λ_max:       {abs(bottom[-1]) / top[0]:.4f}")
    print(f"trace:                 {trace.trace:.3f} ± {trace.stderr:.3f}")
    print(f"2 / learning rate:     {2 / model.lr:.1f}   (sharpness above it makes SGD unstable)")
    print(f"Hessian-vector products: {eig.n_hvp} + {trace.n_hvp} in {seconds:.2f} s")


if __name__ == "__main__":
    main()
