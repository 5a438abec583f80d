"""Trace estimators on explicit matrices: block-sign probes, Hutch++ and their errors."""

import pytest
import torch

from lightning_landscape.curvature import (
    DenseOperator,
    hutchinson,
    hutchpp,
    slq,
    slq_with_trace,
)


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


def _krylov_trace(operator, max_iter, generator, block_sizes, tol):
    """The trace of ``slq_with_trace``, 20 Lanczos steps as the sketch, within ``max_iter``."""
    return slq_with_trace(
        operator,
        n_steps=20,
        trace_tol=tol,
        trace_max_iter=max_iter - 20,
        generator=generator,
        block_sizes=block_sizes,
    )[1]


@pytest.mark.parametrize("estimator", [hutchinson, hutchpp, _krylov_trace])
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


def test_the_lanczos_sketch_is_exact_on_a_low_rank_matrix_and_spares_the_density():
    u = torch.randn(200, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    low_rank = DenseOperator(u @ u.T)
    density, trace = slq_with_trace(low_rank, n_steps=10, trace_max_iter=40, generator=3)
    assert trace.trace == pytest.approx(float((u @ u.T).trace()), rel=1e-10)
    # one restart of the closed Krylov space finds nothing more; then the fewest samples
    assert trace.converged and trace.n_hvp == 1 + 4
    alone = slq(low_rank, n_vectors=1, n_steps=10, generator=3)
    assert torch.equal(density.nodes, alone.nodes) and torch.equal(density.weights, alone.weights)


def test_repeated_eigenvalues_are_all_in_the_lanczos_sketch():
    # An MSE head's Hessian repeats each eigenvalue once per output (here I₃ ⊗ u uᵀ): one
    # start vector's Krylov space holds one copy, and closes; restarts find the others.
    u = torch.randn(40, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    repeated = torch.kron(torch.eye(3, dtype=torch.float64), u @ u.T)
    density, trace = slq_with_trace(DenseOperator(repeated), n_steps=30, generator=0)
    assert density.n_hvp == 3  # the start vector's Krylov space: 2 directions and its own
    assert trace.trace == pytest.approx(float(repeated.trace()), rel=1e-10)
    assert trace.stderr < 1e-8


def test_the_lanczos_sketch_beats_hutchpp_for_the_same_products_beyond_the_density():
    # more outlying eigenvalues (30) than Hutch++'s sketch (10) spans, over a bulk: a
    # network's Hessian has about as many outliers as classes
    rng = torch.Generator().manual_seed(4)
    basis = torch.linalg.qr(torch.randn(300, 300, generator=rng, dtype=torch.float64)).Q
    outliers = 100 + 50 * torch.rand(30, generator=rng, dtype=torch.float64)
    spectrum = torch.cat([outliers, torch.rand(270, generator=rng, dtype=torch.float64)])
    operator = DenseOperator(basis @ torch.diag(spectrum) @ basis.T)

    def spread(estimate):
        return torch.tensor([estimate(seed).trace for seed in range(40)]).std().item()

    sketched = spread(lambda seed: hutchpp(operator, 1e-9, 60, generator=seed))
    krylov = spread(
        lambda seed: slq_with_trace(
            operator, n_steps=48, trace_tol=1e-9, trace_max_iter=60, generator=seed
        )[1]
    )
    assert krylov < sketched / 10  # 0.95 against 96.5


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
