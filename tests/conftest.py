"""Every test starts from the same random state.

torch seeds its default generator differently in every process, so a test that draws
initial weights or a shuffle without seeding would see other numbers in every run.
"""

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
