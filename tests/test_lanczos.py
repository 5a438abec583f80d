"""Lanczos and power iteration on explicit matrices with known spectra."""

import pytest
import torch

from lightning_landscape.curvature import (
    AsymmetricOperatorError,
    DenseOperator,
    hutchpp,
    lanczos,
    power_iteration,
    slq,
)


def _matrix(eigenvalues, seed=0):
    eigenvalues = torch.as_tensor(eigenvalues, dtype=torch.float64)
    q, _ = torch.linalg.qr(
        torch.randn(
            len(eigenvalues),
            len(eigenvalues),
            generator=torch.Generator().manual_seed(seed),
            dtype=torch.float64,
        )
    )
    return q @ torch.diag(eigenvalues) @ q.T


def test_repeated_top_eigenvalue_is_found_with_its_multiplicity():
    spectrum = [5.0, 5.0, 5.0, 3.0, 2.0, 1.0, 0.5, -1.0, -1.0, -2.0]
    result = lanczos(DenseOperator(_matrix(spectrum)), k=3, which="both", tol=1e-10)
    assert result.converged
    torch.testing.assert_close(
        result.eigenvalues, torch.tensor([5.0, 5.0, 5.0, -1.0, -1.0, -2.0], dtype=torch.float64)
    )


def test_zero_operator_stops_after_a_few_products():
    result = lanczos(DenseOperator(torch.zeros(500, 500, dtype=torch.float64)), k=3)
    assert result.converged and result.n_hvp <= 5
    assert (result.eigenvalues == 0).all()


def test_large_operator_converges_long_before_its_dimension():
    spectrum = torch.cat([torch.tensor([50.0, 30.0, 20.0, -5.0]), torch.linspace(-1, 1, 2000)])
    operator = DenseOperator(_matrix(spectrum.tolist()))
    result = lanczos(operator, k=1, which="both")
    assert result.converged and result.n_hvp < 60
    torch.testing.assert_close(
        result.eigenvalues, torch.tensor([50.0, -5.0], dtype=torch.float64), rtol=1e-3, atol=0
    )


def test_warm_start_needs_far_fewer_products():
    spectrum = torch.cat([torch.tensor([10.0, 9.0, 8.0]), torch.linspace(-0.5, 4, 1500)])
    matrix = _matrix(spectrum.tolist())
    cold = lanczos(DenseOperator(matrix), k=1, tol=1e-4)
    perturbation = 1e-3 * _matrix(
        torch.randn(1503, generator=torch.Generator().manual_seed(5)).tolist(), seed=1
    )
    warm = lanczos(DenseOperator(matrix + perturbation), k=1, tol=1e-4, init=cold.eigenvectors)
    exact = torch.linalg.eigvalsh(matrix + perturbation)[-1]
    assert warm.converged and warm.n_hvp * 3 <= cold.n_hvp
    torch.testing.assert_close(warm.eigenvalues[0], exact, rtol=1e-4, atol=0)


def test_warm_start_from_an_exact_eigenvector_still_finds_the_top():
    spectrum = [4.0, 3.0, 2.0, 1.0] + [0.1] * 50
    matrix = _matrix(spectrum)
    _, vectors = torch.linalg.eigh(matrix)
    third = vectors[:, -3]  # eigenvector of 2.0, orthogonal to the top one
    result = lanczos(DenseOperator(matrix), k=1, init=third, tol=1e-8)
    torch.testing.assert_close(result.eigenvalues, torch.tensor([4.0], dtype=torch.float64))


def test_basis_on_another_device_gives_the_same_result():
    matrix = _matrix(torch.linspace(-1, 3, 300).tolist())
    on_device = lanczos(DenseOperator(matrix), k=2, which="both")
    on_cpu = lanczos(DenseOperator(matrix), k=2, which="both", basis_device="cpu")
    torch.testing.assert_close(on_cpu.eigenvalues, on_device.eigenvalues)


def test_results_are_reproducible_from_a_seed():
    matrix = _matrix(torch.linspace(-1, 3, 300).tolist())
    first = lanczos(DenseOperator(matrix), k=2, generator=7)
    second = lanczos(DenseOperator(matrix), k=2, generator=torch.Generator().manual_seed(11))
    again = lanczos(DenseOperator(matrix), k=2, generator=7)
    torch.testing.assert_close(first.eigenvectors, again.eigenvectors, rtol=0, atol=0)
    assert first.n_hvp == again.n_hvp
    torch.testing.assert_close(first.eigenvalues, second.eigenvalues, rtol=1e-3, atol=0)


def test_power_iteration_shifts_past_a_dominant_negative_eigenvalue():
    matrix = _matrix([-10.0, 1.0, 0.5, 0.0, -0.2])
    largest = power_iteration(DenseOperator(matrix), k=2, tol=1e-9, max_iter=5000)
    torch.testing.assert_close(
        largest.eigenvalues, torch.tensor([1.0, 0.5], dtype=torch.float64), rtol=1e-6, atol=0
    )
    smallest = power_iteration(
        DenseOperator(matrix), k=1, which="smallest", tol=1e-9, max_iter=5000
    )
    torch.testing.assert_close(smallest.eigenvalues, torch.tensor([-10.0], dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"k": 0}, ValueError),
        ({"k": 1.5}, TypeError),
        ({"k": 11}, ValueError),
        ({"which": "top"}, ValueError),
        ({"tol": 0.0}, ValueError),
        ({"tol": -1e-3}, ValueError),
        ({"max_iter": 0}, ValueError),
        ({"init": torch.ones(3, dtype=torch.float64)}, ValueError),
        ({"generator": "seed"}, TypeError),
    ],
)
def test_bad_arguments(kwargs, error):
    operator = DenseOperator(_matrix(list(range(10))))
    name = next(iter(kwargs))
    with pytest.raises(error, match=f"`{name}`"):
        lanczos(operator, **kwargs)


def test_budget_exhausted_reports_not_converged():
    matrix = _matrix(torch.linspace(0, 1, 400).tolist())  # no gap at the top: slow
    result = lanczos(DenseOperator(matrix), k=1, tol=1e-9, max_iter=20)
    assert not result.converged and result.n_hvp == 20
    assert result.residuals[0] > 1e-9 * result.eigenvalues[0]


def test_when_the_budget_runs_out_each_pair_says_whether_it_met_the_tolerance():
    """An isolated top settles in a few products; a bottom at the edge of a dense cluster
    does not."""
    spectrum = torch.cat([torch.tensor([10.0]), torch.linspace(-1, 1, 300)]).tolist()
    for method in (lanczos, power_iteration):
        result = method(DenseOperator(_matrix(spectrum)), k=1, which="both", max_iter=12)
        assert not result.converged
        assert result.pair_converged.tolist() == [True, False]
        top, bottom = result.eigenvalues.tolist()
        assert result.residuals[0] <= 1e-3 * abs(top)
        assert result.residuals[1] > 1e-3 * abs(bottom)


def test_tolerance_relative_to_the_spectral_radius():
    """λ_min at the edge of a dense bulk: wanted to tol·λ_max, it needs fewer products."""
    spectrum = torch.cat([torch.tensor([10.0]), torch.linspace(-0.05, 0.5, 1500)])
    matrix = _matrix(spectrum.tolist())
    own = lanczos(DenseOperator(matrix), k=1, which="both", max_iter=300)
    radius = lanczos(
        DenseOperator(matrix), k=1, which="both", max_iter=300, relative_to="spectral_radius"
    )
    assert radius.converged and radius.n_hvp < own.n_hvp
    assert (radius.residuals <= 1e-3 * 10.0).all()
    assert abs(radius.eigenvalues[-1] + 0.05) <= 1e-3 * 10.0
    with pytest.raises(ValueError, match="`relative_to`"):
        lanczos(DenseOperator(matrix), relative_to="norm")


@pytest.mark.parametrize("seed", range(4))
def test_from_a_random_start_a_negative_eigenvalue_behind_a_bulk_at_zero_is_found(seed):
    """λ_min = −3 % of λ_max below 1,500 eigenvalues in [0, 0.01].

    The spectral-radius rule may stop while the bottom Ritz value is still in the bulk;
    the rule relaxed only for clearly negative values may not.
    """
    spectrum = [1.0, *torch.linspace(0, 0.01, 1498).tolist(), -0.03]
    operator = DenseOperator(_matrix(spectrum))
    result = lanczos(
        operator, 1, "both", tol=1e-2, generator=seed, relative_to="spectral_radius_if_negative"
    )
    assert abs(result.eigenvalues[-1].item() + 0.03) <= 1e-2 * 1.0
    strict = lanczos(operator, 1, "both", tol=1e-2, generator=seed, relative_to="eigenvalue")
    assert result.n_hvp <= strict.n_hvp


def test_a_lambda_min_near_zero_is_wanted_to_a_tenth_of_the_tolerance():
    operator = DenseOperator(_matrix([1.0, *torch.linspace(1e-3, 0.01, 600).tolist()]))
    relaxed = lanczos(operator, 1, "both", tol=1e-2, relative_to="spectral_radius_if_negative")
    radius = lanczos(operator, 1, "both", tol=1e-2, relative_to="spectral_radius")
    assert relaxed.residuals[-1] <= 0.1 * 1e-2 * 1.0 < radius.residuals[-1]
    assert relaxed.eigenvalues[-1].item() == pytest.approx(1e-3, abs=0.1 * 1e-2 * 1.0)


@pytest.mark.parametrize(("skew", "symmetric"), [(0.3, False), (1e-4, True)])
def test_products_that_are_not_symmetric_are_refused_and_rounding_is_not(skew, symmetric):
    """A skew part of 0.3 of the spectral radius (a double backward that leaves part of
    the gradient out) is refused by every solver and by Hutch++; one of 1e-4 (far above float32
    rounding) is not."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(60, 60, dtype=torch.float64, generator=generator)
    symmetric_part = (a + a.T) / 2
    skew_part = (a - a.T) / 2
    radius = torch.linalg.eigvalsh(symmetric_part).abs().max()
    skew_part *= skew * radius / torch.linalg.matrix_norm(skew_part, 2)
    operator = DenseOperator(symmetric_part + skew_part)
    solvers = [
        lambda: lanczos(operator, which="both", tol=1e-6),
        lambda: slq(operator, n_vectors=1, n_steps=20),
        lambda: power_iteration(operator, which="both", tol=1e-6, max_iter=5000),
        lambda: hutchpp(operator, sketch_size=4),
    ]
    for solve in solvers:
        if symmetric:
            solve()
            continue
        with pytest.raises(AsymmetricOperatorError, match="products are not symmetric"):
            solve()
