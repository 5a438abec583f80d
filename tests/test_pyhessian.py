"""Cross-checks against PyHessian, the reference implementation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_landscape.curvature import hessian_eigenvalues, hessian_trace

pyhessian = pytest.importorskip("pyhessian")

# PyHessian calls backward(create_graph=True) on the parameters; we do not.
pytestmark = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")


def _mlp():
    return nn.Sequential(
        nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)
    )


def _cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 5),
    )


CASES = {"mlp": (_mlp, (64, 20)), "cnn": (_cnn, (32, 3, 8, 8))}


def _case(name):
    torch.manual_seed(0)
    factory, shape = CASES[name]
    model = factory()
    x, y = torch.randn(shape), torch.randint(0, 5, (shape[0],))
    model.eval()
    with torch.no_grad():  # give BatchNorm non-trivial running statistics
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model, x, y


@pytest.mark.parametrize("name", sorted(CASES))
def test_top_eigenvalue_agrees_with_pyhessian(name):
    model, x, y = _case(name)
    ours = hessian_eigenvalues(
        model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y), mode="eval"
    )
    torch.manual_seed(1)
    reference = pyhessian.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    theirs, _ = reference.eigenvalues(maxIter=1000, tol=1e-6, top_n=1)
    assert ours.converged
    assert ours.eigenvalues[0].item() == pytest.approx(theirs[0], rel=1e-2)


def test_trace_agrees_with_pyhessian_within_standard_errors():
    model, x, y = _case("mlp")
    ours = hessian_trace(
        model,
        lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        (x, y),
        mode="eval",
        tol=1e-2,
        max_iter=400,
    )
    torch.manual_seed(1)
    samples = torch.tensor(
        pyhessian.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False).trace(
            maxIter=400, tol=1e-9
        )
    )
    theirs, their_stderr = samples.mean().item(), (samples.std() / len(samples) ** 0.5).item()
    assert abs(ours.trace - theirs) <= 3 * (ours.stderr**2 + their_stderr**2) ** 0.5
