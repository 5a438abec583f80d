"""Lightning's own ``BoringModel``: batches that are bare tensors (one sample each), and a
linear least-squares loss whose Hessian is known in closed form."""

import lightning.pytorch as pl
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_landscape import (
    GradientNoiseScaleMonitor,
    HessianEigenvalueMonitor,
    HessianSpectrumMonitor,
    LossLandscapeMonitor,
    SharpnessMonitor,
)
from tests.lightning_support import read_scalars, trainer


def test_every_probe_monitor_measures_bare_tensor_batches(tmp_path):
    pl.seed_everything(0)
    eigen = HessianEigenvalueMonitor(every_n_steps=4)
    monitors = [
        eigen,
        HessianSpectrumMonitor(every_n_epochs=None),
        SharpnessMonitor(every_n_steps=4),
        LossLandscapeMonitor(),
    ]
    trainer(tmp_path, monitors, max_steps=8).fit(BoringModel())
    logged = read_scalars(tmp_path)
    (x,) = eigen._probe_data  # one batch: a (1, 32) tensor
    # mean squared error of a 32 -> 2 linear layer on one sample: each output's block of
    # the Hessian is z zᵀ with z = [x, 1], so the eigenvalues are |x|² + 1 (twice) and 0
    curvature = float(x.pow(2).sum()) + 1
    assert logged["landscape/hessian/lambda_max"][8] == pytest.approx(curvature, rel=1e-4)
    assert logged["landscape/hessian/lambda_min"][8] == pytest.approx(0, abs=1e-3 * curvature)
    assert logged["landscape/hessian/saddle"][8] == 0.0
    assert logged["landscape/spectrum/trace"][8] == pytest.approx(2 * curvature, rel=1e-4)
    assert set(logged["landscape/sharpness/sam"]) == {4, 8}
    assert set(logged["landscape/slices/center_loss"]) == {8}


def test_a_batch_too_small_to_split_warns_once_and_training_goes_on(tmp_path):
    monitor = GradientNoiseScaleMonitor(every_n_steps=2)
    fit = trainer(tmp_path, [monitor], max_steps=8)
    with pytest.warns(
        UserWarning, match="skipped the measurement at step 2: a batch of 1"
    ) as caught:
        fit.fit(BoringModel())
    assert len([w for w in caught if "GradientNoiseScaleMonitor" in str(w.message)]) == 1
    assert fit.global_step == 8
    assert not [tag for tag in read_scalars(tmp_path) if "noise_scale" in tag]
