"""``steplog plot``: learning curves with matplotlib (imported here only, with the Agg backend),
one panel per metric group (the part of a name before its first ``/``), every run overlaid."""

from __future__ import annotations

import collections
import fnmatch
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steplog.readback import RunData

__all__ = ["MAX_PANELS", "NothingToPlotError", "groups", "plot_runs", "smooth"]


MAX_PANELS = 60
"""The most metric groups one image draws (each a panel); more take ``--metrics``."""


class NothingToPlotError(ValueError):
    """No metric matches, or too many to draw in one image."""


def _literal(text: str) -> str:
    """``text`` as matplotlib shows it literally (a ``$`` would start math text)."""
    return text.replace("$", r"\$")


def groups(runs: Sequence[RunData], pattern: str | None = None) -> dict[str, list[str]]:
    """Metric names per group, sorted, keeping those matching the glob ``pattern`` (all when
    ``None``)."""
    out: dict[str, set[str]] = {}
    for run in runs:
        for name in run.series:
            if pattern is None or fnmatch.fnmatchcase(name, pattern):
                out.setdefault(name.split("/", 1)[0], set()).add(name)
    return {g: sorted(names) for g, names in sorted(out.items())}


def smooth(values: Sequence[float], k: int) -> list[float]:
    """The trailing mean over the last ``k`` points at each point (NaN and infinities skipped)."""
    if k <= 1:
        return list(values)
    out: list[float] = []
    window: collections.deque[float] = collections.deque()
    partials: list[float] = []  # the window's exact sum (a float total loses small values)
    for v in values:
        if math.isfinite(v):
            window.append(v)
            _add_exactly(partials, v)
            if len(window) > k:
                _add_exactly(partials, -window.popleft())
        if not window:
            out.append(math.nan)
            continue
        try:
            mean = math.fsum(partials) / len(window)
        except (OverflowError, ValueError):
            mean = math.nan
        if not math.isfinite(mean):  # the window's sum is beyond a float (values near 1e308)
            n = len(window)
            mean = math.fsum(x / n for x in window)
            partials.clear()  # rebuilt: the sum returns to floats once such values leave
            for x in window:
                _add_exactly(partials, x)
        out.append(mean)
    return out


def _add_exactly(partials: list[float], x: float) -> None:
    """Add ``x`` to the sum ``partials`` holds as non-overlapping floats (Shewchuk's method,
    as ``math.fsum`` sums), so that a value added and later taken away leaves no error."""
    i = 0
    for y in partials:
        if abs(x) < abs(y):
            x, y = y, x
        hi = x + y
        lo = y - (hi - x)
        if lo:
            partials[i] = lo
            i += 1
        x = hi
    partials[i:] = [x]


def plot_runs(runs: Sequence[RunData], output: Path, *, pattern: str | None = None,
              smooth_k: int = 1) -> Any:
    """Draw every metric of ``runs`` (matching ``pattern``) into ``output`` (PNG) and return the
    matplotlib figure (closed). Raises :class:`NothingToPlotError` when no metric matches or
    more than :data:`MAX_PANELS` groups do, ``ImportError``
    with the install command when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("steplog plot draws with matplotlib: pip install "
                          "'steplog[plot]'") from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = groups(runs, pattern)
    if not panels:
        raise NothingToPlotError("no metric to plot" +
                                 (f" matches {pattern!r}" if pattern else ""))
    if len(panels) > MAX_PANELS:
        raise NothingToPlotError(
            f"{len(panels)} metric groups: more than the {MAX_PANELS} panels one image holds; "
            "choose some with --metrics (a glob, e.g. 'train/*')")
    cols = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 3.6 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for ax, (group, names) in zip(axes.flat, panels.items(), strict=False):
        lines, labels = [], []
        for r, run in enumerate(runs):
            for n, name in enumerate(names):
                s = run.series.get(name)
                if s is None:
                    continue
                label = name if len(runs) == 1 else f"{run.label}: {name}"
                color = colors[(n if len(runs) == 1 else r) % len(colors)]
                style = styles[(n if len(runs) > 1 else 0) % len(styles)]
                if smooth_k > 1:  # the raw points faint behind their smoothed curve
                    ax.plot(s.steps, s.values, color=color, alpha=0.2, linewidth=0.8)
                (line,) = ax.plot(s.steps, smooth(s.values, smooth_k), color=color,
                                  linestyle=style, linewidth=1.5,
                                  marker="o" if len(s.steps) < 3 else None, markersize=4)
                lines.append(line)
                labels.append(_literal(label))
        ax.set_title(_literal(group))
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        # Given explicitly: matplotlib leaves out labels that start with "_".
        ax.legend(lines, labels, fontsize="small", loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    title = _literal(runs[0].label) if len(runs) == 1 else f"{len(runs)} runs"
    fig.suptitle(title + (f" (trailing mean of {smooth_k})" if smooth_k > 1 else ""))
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return fig
