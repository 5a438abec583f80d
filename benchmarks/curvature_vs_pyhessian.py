"""Curvature engine against PyHessian, side by side in one process (CPU, one thread).

Prints a table: task, method, median wall time, Hessian-vector products, relative error
against a float64 tight-tolerance reference, and the ratio ours / PyHessian. PyHessian's
eigenvalue tolerance is tightened (1e-3 → 1e-6) until it reaches the accuracy our default
settings reach, so times are compared at equal accuracy.

Run: ``python benchmarks/curvature_vs_pyhessian.py [--models mlp resnet] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyhessian
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import CASES, cross_entropy, make_case

from lightning_landscape.curvature import HessianOperator, hessian_eigenvalues, hessian_trace

# The package exports a class named like its module: reach the module itself.
PYHESSIAN_MODULE = importlib.import_module("pyhessian.hessian")
TARGET_ERROR = 1e-3
PYHESSIAN_TOLS = (1e-3, 1e-4, 1e-5, 1e-6)


@dataclass
class Row:
    model: str
    task: str
    method: str
    seconds: float
    n_hvp: float | None = None
    error: float | None = None
    note: str = ""
    ratio: float | None = None


class PyHessianCounter:
    """Counts PyHessian's Hessian-vector products by wrapping its module-level function."""

    def __init__(self) -> None:
        self.count = 0
        original = PYHESSIAN_MODULE.hessian_vector_product

        def counted(*args: Any) -> Any:
            self.count += 1
            return original(*args)

        PYHESSIAN_MODULE.hessian_vector_product = counted


def median_time(fn: Callable[[int], Any], repeats: int) -> tuple[float, list[Any]]:
    """Median seconds of ``fn(seed)`` over ``repeats`` seeds, and every result."""
    times, results = [], []
    for seed in range(repeats):
        start = time.perf_counter()
        results.append(fn(seed))
        times.append(time.perf_counter() - start)
    return statistics.median(times), results


def relative_error(values: list[float], reference: torch.Tensor) -> float:
    return max(abs(v - r) / abs(r) for v, r in zip(values, reference.tolist()))


def pyhessian_object(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Any:
    model.zero_grad(set_to_none=True)
    return pyhessian.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)


def bench_hvp(name: str, model: nn.Module, x, y, repeats: int) -> list[Row]:
    ours = HessianOperator(model, cross_entropy, (x, y), mode="eval")
    vector = torch.randn(ours.size)
    ours.matvec(vector)  # build the graph outside the timing, like PyHessian's constructor
    theirs = pyhessian_object(model, x, y)
    split = [
        t.view_as(p)
        for t, p in zip(vector.split([p.numel() for p in theirs.params]), theirs.params)
    ]
    rounds = max(repeats, 10)
    ours_time, _ = median_time(lambda _: ours.matvec(vector), rounds)
    their_time, _ = median_time(
        lambda _: PYHESSIAN_MODULE.hessian_vector_product(theirs.gradsH, theirs.params, split),
        rounds,
    )
    model.zero_grad(set_to_none=True)
    return [
        Row(name, "one HVP (graph kept)", "ours", ours_time, 1, ratio=ours_time / their_time),
        Row(name, "one HVP (graph kept)", "PyHessian", their_time, 1),
    ]


def bench_eigen(
    name: str, model: nn.Module, x, y, k: int, reference: torch.Tensor, repeats: int
) -> list[Row]:
    counter = PyHessianCounter()
    task = f"top-{k} eigenvalue{'s' if k > 1 else ''}"

    def ours(seed: int):
        return hessian_eigenvalues(model, cross_entropy, (x, y), k=k, mode="eval", generator=seed)

    ours_time, results = median_time(ours, repeats)
    ours_error = max(relative_error(r.eigenvalues.tolist(), reference) for r in results)
    rows = [
        Row(
            name,
            task,
            "ours (defaults)",
            ours_time,
            statistics.mean(r.n_hvp for r in results),
            ours_error,
        )
    ]

    chosen = None
    for tol in PYHESSIAN_TOLS:

        def theirs(seed: int, tol: float = tol):
            torch.manual_seed(seed)
            counter.count = 0
            values, _ = pyhessian_object(model, x, y).eigenvalues(maxIter=1000, tol=tol, top_n=k)
            return sorted(values, reverse=True), counter.count

        their_time, outcomes = median_time(theirs, repeats)
        error = max(relative_error(values, reference) for values, _ in outcomes)
        row = Row(
            name,
            task,
            f"PyHessian tol={tol:g}",
            their_time,
            statistics.mean(c for _, c in outcomes),
            error,
        )
        rows.append(row)
        if error <= max(ours_error, TARGET_ERROR):
            chosen = row
            break
    if chosen is not None:
        rows[0].ratio = ours_time / chosen.seconds
        chosen.note = "equal accuracy"
    model.zero_grad(set_to_none=True)
    return rows


def bench_trace(name: str, model: nn.Module, x, y, repeats: int) -> list[Row]:
    """Ours with defaults against PyHessian's defaults and 100 samples.

    PyHessian's Hutchinson samples are i.i.d., so its standard error falls as 1/√n; the time
    it needs for our standard error is extrapolated from its 100-sample run by that law.
    """

    def ours(seed: int):
        return hessian_trace(model, cross_entropy, (x, y), mode="eval", generator=seed)

    ours_time, results = median_time(ours, repeats)
    ours_rel_se = statistics.median(r.stderr / abs(r.trace) for r in results)
    rows = [
        Row(
            name,
            "trace",
            "ours (defaults: Hutch++, block signs)",
            ours_time,
            statistics.mean(r.n_hvp for r in results),
            note=f"rel. stderr {ours_rel_se:.2e}",
        )
    ]
    # PyHessian stops when the running mean changes by less than tol (relative); a huge
    # negative tol makes it draw exactly maxIter samples.
    for label, kwargs in (("defaults", {}), ("maxIter=100", {"maxIter": 100, "tol": -1e30})):

        def theirs(seed: int, kwargs: dict = kwargs):
            torch.manual_seed(seed)
            samples = torch.tensor(
                pyhessian_object(model, x, y).trace(**kwargs), dtype=torch.float64
            )
            return samples.mean().item(), (samples.std() / len(samples) ** 0.5).item(), len(samples)

        their_time, outcomes = median_time(theirs, repeats)
        their_rel_se = statistics.median(se / abs(mean) for mean, se, _ in outcomes)
        rows.append(
            Row(
                name,
                "trace",
                f"PyHessian {label}",
                their_time,
                statistics.mean(n for *_, n in outcomes),
                note=f"rel. stderr {their_rel_se:.2e}",
            )
        )
    factor = (their_rel_se / ours_rel_se) ** 2
    rows.append(
        Row(
            name,
            "trace",
            "PyHessian at our stderr (1/√n law)",
            their_time * factor,
            100 * factor,
            note="extrapolated from maxIter=100",
        )
    )
    rows[0].ratio = ours_time / rows[-1].seconds
    model.zero_grad(set_to_none=True)
    return rows


def bench_warm_start(name: str, model: nn.Module, x, y) -> list[Row]:
    cold_before = hessian_eigenvalues(model, cross_entropy, (x, y), mode="eval")
    loss = cross_entropy(model, (x, y))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with torch.no_grad():  # one SGD step
        for p, g in zip(model.parameters(), grads):
            p.sub_(0.05 * g)
    start = time.perf_counter()
    cold = hessian_eigenvalues(model, cross_entropy, (x, y), mode="eval", generator=1)
    cold_time = time.perf_counter() - start
    start = time.perf_counter()
    warm = hessian_eigenvalues(
        model, cross_entropy, (x, y), mode="eval", init=cold_before.eigenvectors
    )
    warm_time = time.perf_counter() - start
    error = abs(warm.eigenvalues[0] - cold.eigenvalues[0]).item() / abs(cold.eigenvalues[0]).item()
    return [
        Row(
            name,
            "top-1 after one SGD step",
            "ours, warm start",
            warm_time,
            warm.n_hvp,
            note=f"vs cold: {error:.1e}",
            ratio=warm.n_hvp / cold.n_hvp,
        ),
        Row(name, "top-1 after one SGD step", "ours, cold start", cold_time, cold.n_hvp),
    ]


def memory_probe(name: str, which: str) -> None:
    """Child process: print the peak resident memory a top-1 measurement adds, in MiB."""
    torch.set_num_threads(1)
    model, x, y = make_case(name)
    cross_entropy(model, (x, y))  # warm up allocator and kernels
    with open("/proc/self/statm") as statm:
        baseline = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    if which == "ours":
        hessian_eigenvalues(model, cross_entropy, (x, y), mode="eval")
    else:
        pyhessian_object(model, x, y).eigenvalues(maxIter=1000, tol=1e-4, top_n=1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"extra_mib": (peak - baseline) / 2**20}))


def bench_memory(name: str) -> list[Row]:
    extra = {}
    for which in ("ours", "pyhessian"):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-probe", name, which],
            capture_output=True,
            text=True,
            check=True,
        )
        extra[which] = json.loads(out.stdout.strip().splitlines()[-1])["extra_mib"]
    return [
        Row(
            name,
            "peak extra memory, top-1",
            "ours",
            float("nan"),
            note=f"{extra['ours']:.0f} MiB",
            ratio=extra["ours"] / extra["pyhessian"],
        ),
        Row(
            name,
            "peak extra memory, top-1",
            "PyHessian tol=1e-4",
            float("nan"),
            note=f"{extra['pyhessian']:.0f} MiB",
        ),
    ]


def print_table(rows: list[Row]) -> None:
    def fmt(value: float | None, spec: str) -> str:
        return "" if value is None or math.isnan(value) else format(value, spec)

    print("| model | task | method | time (s) | HVPs | rel. error | note | ours / PyHessian |")
    print("|---|---|---|---:|---:|---:|---|---:|")
    for r in rows:
        print(
            f"| {r.model} | {r.task} | {r.method} | {fmt(r.seconds, '.3f')} | {fmt(r.n_hvp, '.1f')} | "
            f"{fmt(r.error, '.1e')} | {r.note} | {fmt(r.ratio, '.2f')} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--memory-probe", nargs=2, metavar=("MODEL", "WHICH"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.memory_probe:
        memory_probe(*args.memory_probe)
        return
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread, PyHessian 0.1, median of {args.repeats}\n"
    )
    rows: list[Row] = []
    for name in args.models:
        model, x, y = make_case(name)
        reference = hessian_eigenvalues(
            model,
            cross_entropy,
            (x, y),
            k=3,
            mode="eval",
            tol=1e-8,
            max_iter=300,
            dtype=torch.float64,
        ).eigenvalues
        print(
            f"{name}: reference top-3 (float64, tol 1e-8): {[round(v, 6) for v in reference.tolist()]}",
            flush=True,
        )
        rows += bench_hvp(name, model, x, y, args.repeats)
        rows += bench_eigen(name, model, x, y, 1, reference[:1], args.repeats)
        rows += bench_eigen(name, model, x, y, 3, reference, args.repeats)
        rows += bench_trace(name, model, x, y, args.repeats)
        rows += bench_memory(name)
        rows += bench_warm_start(name, *make_case(name))
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
