"""Mean and standard error of i.i.d. Monte-Carlo samples."""

from __future__ import annotations

import math


class Samples:
    """Running mean and standard error of i.i.d. samples."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def mean(self) -> float:
        return math.fsum(self.values) / len(self.values)

    @property
    def stderr(self) -> float:
        n = len(self.values)
        if n < 2:
            return float("inf")
        mean = self.mean
        return math.sqrt(math.fsum((v - mean) ** 2 for v in self.values) / (n - 1) / n)
