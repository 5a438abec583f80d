"""Trace estimators on explicit matrices: block-sign probes, Hutch++ and their errors."""

import pytest
import torch

from lightning_landscape.curvature import DenseOperator, hutchinson, hutchpp


def _symmetric(n, seed):
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a + a.T


def test_block_signs_cancel_cross_block_terms_exactly():
    sizes = [3, 5, 4]
    coupling = _symmetric(12, 0)
    start = 0
    for size in sizes:  # zero the diagonal blocks: all trace-free coupling
        coupling[start : start + size, start : start + size] = 0
        start += size
    result = hutchinson(DenseOperator(coupling), max_iter=40, block_sizes=sizes)
    assert result.trace == pytest.approx(0.0, abs=1e-12) and result.stderr < 1e-12
    plain = hutchinson(DenseOperator(coupling), max_iter=40)
    assert plain.stderr > 0.1  # plain probes see the coupling as noise


@pytest.mark.parametrize("estimator", [hutchinson, hutchpp])
@pytest.mark.parametrize("blocks", [None, [10, 20, 30, 5, 15]])
def test_estimators_are_unbiased(estimator, blocks):
    matrix = _symmetric(80, 1) + 40 * torch.eye(80, dtype=torch.float64)
    estimates = torch.tensor(
        [
            estimator(
                DenseOperator(matrix), max_iter=60, generator=seed, block_sizes=blocks, tol=1e-9
            ).trace
            for seed in range(200)
        ]
    )
    stderr = estimates.std() / 200**0.5
    assert abs(estimates.mean() - matrix.trace()) <= 4 * stderr


def test_hutchpp_is_exact_on_a_low_rank_matrix():
    u = torch.randn(200, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    low_rank = u @ u.T
    result = hutchpp(DenseOperator(low_rank), sketch_size=6, max_iter=60)
    assert result.trace == pytest.approx(float(low_rank.trace()), rel=1e-10)
    assert result.converged and result.n_hvp == 2 * 6 + 4  # sketch, then the fewest samples


def test_budget_and_convergence_flags():
    matrix = _symmetric(300, 3)
    result = hutchinson(DenseOperator(matrix), tol=1e-6, max_iter=20)
    assert not result.converged and result.n_hvp == 20


@pytest.mark.parametrize(
    "kwargs, match",
    [({"n_patterns": 3}, "`n_patterns`"), ({"max_iter": 3}, "`max_iter`"), ({"tol": 0}, "`tol`")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hutchinson(DenseOperator(torch.eye(4)), **kwargs)
