"""PNG plots with matplotlib's Agg backend (no display needed), small enough to commit."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: never try to open a window
import matplotlib.pyplot as plt  # noqa: E402

# A fixed colour per method family, so figures of different suites read alike.
METHOD_COLOURS = {
    "kvarn": "#d62728",
    "kivi": "#1f77b4",
    "hadamard_rtn": "#2ca02c",
    "varn_norot": "#9467bd",
    "per_token_rtn": "#8c564b",
    "fp8_e4m3": "#ff7f0e",
    "hf_quanto": "#e377c2",
    "none": "#7f7f7f",
    "16-bit": "#000000",
}
PRESET_STYLES = {"k4v4": "-", "k4v2": "--", "k3v2": "-.", "k2v2": ":", "k8v8": (0, (1, 3))}
DPI = 90


def save(fig, path: str | Path) -> Path:
    """Save as a small PNG: rendered by Agg, then stored with a 256-colour palette (plots use few colours)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png")
    plt.close(fig)
    buffer.seek(0)
    image = Image.open(buffer).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    path = Path(path)
    image.save(path, format="PNG", optimize=True)
    return path


def style_for(label: str) -> dict:
    """Colour by method, line style by preset, from a config name such as ``kivi:k2v2``."""
    method, _, rest = label.partition(":")
    preset = rest.split("/")[0].split("+")[0]
    method = method.split("+")[0].split("/")[0]
    return {"color": METHOD_COLOURS.get(method), "linestyle": PRESET_STYLES.get(preset, "-")}


Series = dict[str, tuple[Sequence[float], Sequence[float]]]
Panel = tuple[str, Series]


def preset_of(label: str) -> str | None:
    """``k4v2`` for ``kvarn:k4v2`` / ``kivi:k4v2/g64+nosink``; None for labels without a preset."""
    _, sep, rest = label.partition(":")
    return rest.split("/")[0].split("+")[0] if sep else None


def group_by_preset(labels: Sequence[str]) -> dict[str, list[str]]:
    """Labels grouped by preset, in first-seen order; labels without a preset join every group."""
    groups: dict[str, list[str]] = {}
    for label in labels:
        preset = preset_of(label)
        if preset is not None:
            groups.setdefault(preset, [])
    if not groups:
        return {"": list(labels)}
    for label in labels:
        preset = preset_of(label)
        for key, members in groups.items():
            if preset is None or preset == key:
                members.append(label)
    return groups


def line_grid(
    path: str | Path,
    grid: list[list[Panel]],
    xlabel: str,
    ylabel: str,
    logy: bool = False,
    suptitle: str | None = None,
    vary_linestyle: bool = False,
    legend: str = "row",
) -> Path:
    """A grid of line plots (rows of panels sharing the y axis; ``[panels]`` for one row of
    side-by-side plots); one legend per row, or per panel. Series labels are config names."""
    rows, cols = len(grid), max(len(row) for row in grid)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows + 0.4), sharey="row", squeeze=False)
    for r, row in enumerate(grid):
        for c in range(cols):
            ax = axes[r][c]
            if c >= len(row):
                ax.set_visible(False)
                continue
            title, series = row[c]
            for label, (xs, ys) in series.items():
                pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and (not logy or y > 0)]
                if not pairs:
                    continue
                style = style_for(label)
                if not vary_linestyle:
                    style["linestyle"] = "-"
                ax.plot([p[0] for p in pairs], [p[1] for p in pairs], label=label, linewidth=1.6, **style)
            ax.set_title(title)
            ax.grid(True, alpha=0.3)
            if r == rows - 1:
                ax.set_xlabel(xlabel)
            if logy:
                ax.set_yscale("log")
        axes[r][0].set_ylabel(ylabel)
        if legend == "panel":
            for ax in axes[r][: len(row)]:
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7, loc="best")
            continue
        handles, labels = [], []
        for ax in axes[r]:
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        if handles:
            axes[r][len(grid[r]) - 1].legend(handles, labels, fontsize=7, loc="best")
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return save(fig, path)


def grouped_bars(
    path: str | Path,
    groups: Sequence[str],
    series: dict[str, Sequence[float | None]],
    ylabel: str,
    title: str,
    logy: bool = False,
) -> Path:
    """Bars: one group per x label (e.g. preset or context length), one bar per series (e.g. method)."""
    n = max(len(series), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(groups) * n * 0.35 + 3), 3.8))
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        ys = [0.0 if v is None else v for v in values]
        ax.bar(xs, ys, width=width, label=label, color=style_for(label)["color"])
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    if logy:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)
