"""Read the landscape curves back from a run's logs and draw a one-page summary.

Every run below a log directory (every folder holding TensorBoard event files or a
``CSVLogger``'s ``metrics.csv``) becomes one line in each chart, so runs compared side by
side (GD against SGD, one learning rate against another) share the page. Reading uses
TensorBoard's own ``EventAccumulator``; drawing needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_landscape._validation import NAME_PATTERN

Scalars = dict[str, dict[int, float]]  # tag -> step -> value

# (chart title, tags drawn in it); a chart appears when any run has one of its tags.
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # the loss under the names Lightning projects most often give it
    ("loss", ("train/loss", "train_loss", "full_batch/loss", "val/loss", "val_loss")),
    (
        "sharpness λ_max and the stability threshold 2/η (dashed)",
        ("landscape/hessian/lambda_max", "landscape/hessian/stability_threshold"),
    ),
    (
        "preconditioned sharpness λ_max(P⁻¹H) (Adam, RMSprop) and its threshold (dashed)",
        (
            "landscape/hessian/preconditioned_lambda_max",
            "landscape/hessian/preconditioned_threshold",
        ),
    ),
    ("λ_min (below zero: a saddle direction)", ("landscape/hessian/lambda_min",)),
    ("saddle label (1 saddle, 0 minimum-like)", ("landscape/hessian/saddle",)),
    ("Hessian trace", ("landscape/spectrum/trace",)),
    (
        "sharpness measures",
        (
            "landscape/sharpness/sam",
            "landscape/sharpness/adaptive",
            "landscape/sharpness/worst_case",
            "landscape/sharpness/average",
        ),
    ),
    ("gradient norm", ("landscape/grad_norm/total", "landscape/hessian/grad_norm")),
    ("gradient noise scale B_simple", ("landscape/noise_scale/b_simple",)),
    ("global batch size", ("landscape/batch_size/global",)),
)
_DASHED = {"landscape/hessian/stability_threshold", "landscape/hessian/preconditioned_threshold"}
_LOG_SCALE = {"loss", "gradient norm", "gradient noise scale B_simple"}
IMAGE_TAGS = (
    "landscape/spectrum/density",
    "landscape/slices/line",
    "landscape/slices/surface",
    "landscape/slices/from_init",
)


class NoLandscapeData(ValueError):
    """The directory holds no run with ``landscape/`` values."""


@dataclass
class Run:
    """One run's logs: its folder relative to the log directory, scalars and last images."""

    name: str
    scalars: Scalars = field(default_factory=dict)
    images: dict[str, bytes] = field(default_factory=dict)  # tag -> encoded PNG


def read_scalars(log_dir: str | os.PathLike) -> Scalars:
    """Every scalar of every event file below ``log_dir``: tag -> step -> value."""
    merged: Scalars = {}
    for run in read_runs(log_dir):
        for tag, values in run.scalars.items():
            merged.setdefault(tag, {}).update(values)
    return merged


def read_runs(log_dir: str | os.PathLike) -> list[Run]:
    """The runs below ``log_dir`` (folders holding TensorBoard event files or a
    ``CSVLogger``'s ``metrics.csv``), in path order."""
    root = Path(log_dir)
    events = {path.parent for path in root.rglob("events.out.tfevents.*")}
    tables = {path.parent for path in root.rglob("metrics.csv")}
    runs = []
    for folder in sorted(events | tables):
        # A run folder given directly is named by its last two parts ("sgd/version_0").
        run = Run(str(folder.relative_to(root)) if folder != root else "/".join(root.parts[-2:]))
        if folder in events:
            _read_events(folder, run)
        if folder in tables:
            _read_table(folder, run)
        runs.append(run)
    return runs


def _read_events(folder: Path, run: Run) -> None:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 1})
    events.Reload()
    tags = events.Tags()
    for tag in tags["scalars"]:
        run.scalars[tag] = {e.step: e.value for e in events.Scalars(tag)}
    for tag in tags["images"]:
        run.images[tag] = events.Images(tag)[-1].encoded_image_string


_FIGURE_FILE = re.compile(r"(?P<tag>.+)_step(?P<step>\d+)\.png")


def _read_table(folder: Path, run: Run) -> None:
    """A ``CSVLogger`` run: its ``metrics.csv``, and the last figure of each tag that the
    monitors wrote as PNG files, having no logger that takes images."""
    with open(folder / "metrics.csv", newline="") as table:
        rows = csv.DictReader(table)
        if "step" not in (rows.fieldnames or []):  # not a logger's table
            return
        for row in rows:
            step = int(row.pop("step"))
            for tag, value in row.items():
                if value:
                    run.scalars.setdefault(tag, {})[step] = float(value)
    last: dict[str, int] = {}
    for path in (folder / "landscape").rglob("*.png"):
        named = _FIGURE_FILE.fullmatch(path.relative_to(folder).as_posix())
        if named is None:
            continue
        tag, step = named["tag"], int(named["step"])
        if step >= last.get(tag, -1):
            last[tag] = step
            run.images[tag] = path.read_bytes()


def render(
    log_dir: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    html_out: str | os.PathLike | None = None,
) -> Path:
    """Draw the summary page of the runs below ``log_dir`` as a PNG (and optionally HTML).

    Args:
        log_dir: a log directory of TensorBoard or CSV loggers (searched recursively), or
            several.
        out: the PNG to write; default ``<log_dir>/landscape_summary.png`` (the first one).
        html_out: also write an HTML page with the picture and each run's last values.

    Returns:
        The path of the PNG.

    Raises:
        NoLandscapeData: when ``log_dir`` is not a directory, or no run below it logged a
            ``landscape/`` value.
        ImportError: without matplotlib.
    """
    roots = [log_dir] if isinstance(log_dir, (str, os.PathLike)) else list(log_dir)
    missing = [str(root) for root in roots if not Path(root).is_dir()]
    if missing:
        raise NoLandscapeData(f"no such log directory: {', '.join(missing)}")
    runs = [
        run
        for root in roots
        for run in read_runs(root)
        if any(tag.startswith("landscape/") for tag in run.scalars)
    ]
    if not runs:
        raise NoLandscapeData(
            f"no landscape data below {', '.join(map(str, roots))}: no TensorBoard event file or "
            "CSVLogger metrics.csv there holds a `landscape/` value (point at the logger's "
            "save_dir or a version folder)"
        )
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "the report draws with matplotlib: pip install 'lightning-landscape[plot]'"
        ) from err
    panels = [
        (title, tags)
        for title, tags in PANELS
        if any(_logged(tag, run.scalars) for run in runs for tag in tags)
    ]
    images = [
        (run.name, tag, shown, run.images[shown])
        for run in runs
        for tag in IMAGE_TAGS
        for shown in _logged(tag, run.images)
    ]
    columns = 2
    panel_rows = -(-len(panels) // columns)  # ceiling division
    rows = panel_rows + -(-len(images) // columns)
    figure = Figure(figsize=(6.5 * columns, 3.4 * rows), dpi=90)
    for index, (title, tags) in enumerate(panels):
        _draw_panel(figure.add_subplot(rows, columns, index + 1), title, tags, runs)
    first_image = panel_rows * columns
    for index, (name, tag, shown, png) in enumerate(images):
        axes = figure.add_subplot(rows, columns, first_image + index + 1)
        axes.imshow(_decode(png))
        axes.set_title(f"{name}: {shown.removeprefix(tag.rpartition('/')[0] + '/')}", fontsize=9)
        axes.axis("off")
    figure.tight_layout()
    path = Path(out) if out is not None else Path(roots[0]) / "landscape_summary.png"
    figure.savefig(path)
    if html_out is not None:
        Path(html_out).write_text(_html(path, runs))
    return path


def _logged(tag: str, logged: Iterable[str]) -> list[str]:
    """Which of ``tag`` and its named monitors' variants (``landscape/hessian/<name>/lambda_max``
    for ``landscape/hessian/lambda_max``) are among the ``logged`` tags."""
    head, _, leaf = tag.rpartition("/")
    named = re.compile(rf"{re.escape(head)}/{NAME_PATTERN}/{re.escape(leaf)}")
    return sorted(t for t in logged if t == tag or named.fullmatch(t))


def _draw_panel(axes, title: str, tags: Sequence[str], runs: list[Run]) -> None:
    # One run: a colour per curve. Several: a colour per run, a line style per curve.
    styles = ("-", ":", "-.", (0, (1, 3)))
    for run_index, run in enumerate(runs):
        curves = [(tag, shown) for tag in tags for shown in _logged(tag, run.scalars)]
        for index, (tag, shown) in enumerate(curves):
            values = run.scalars[shown]
            steps = sorted(values)
            label = (
                run.name
                if len(tags) == 1 == len(curves)
                else f"{run.name}: {shown.removeprefix('landscape/')}"
            )
            axes.plot(
                steps,
                [values[s] for s in steps],
                color=f"C{run_index if len(runs) > 1 else index}",
                linestyle="--" if tag in _DASHED else styles[index % len(styles)],
                marker="." if len(steps) < 30 else None,
                label=label,
            )
    if title in _LOG_SCALE and all(v > 0 for line in axes.get_lines() for v in line.get_ydata()):
        axes.set_yscale("log")  # a gradient stuck at 1e-7 next to one of order 1
    axes.set_title(title, fontsize=10)
    axes.set_xlabel("optimizer step")
    axes.legend(fontsize=7)


def _decode(png: bytes):
    from matplotlib.image import imread

    return imread(io.BytesIO(png), format="png")


def _html(png: Path, runs: list[Run]) -> str:
    encoded = base64.b64encode(png.read_bytes()).decode()
    rows = []
    for run in runs:
        for tag in sorted(t for t in run.scalars if t.startswith("landscape/")):
            last = run.scalars[tag][max(run.scalars[tag])]
            rows.append(
                f"<tr><td>{html.escape(run.name)}</td><td>{tag}</td><td>{last:.6g}</td></tr>"
            )
    return (
        "<!doctype html><meta charset='utf-8'><title>lightning_landscape report</title>"
        f"<img src='data:image/png;base64,{encoded}' style='max-width:100%'>"
        "<table><tr><th>run</th><th>metric</th><th>last value</th></tr>"
        + "".join(rows)
        + "</table>"
    )
