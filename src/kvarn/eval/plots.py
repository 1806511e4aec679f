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
    "none": "#7f7f7f",
}
PRESET_STYLES = {"k4v4": "-", "k4v2": "--", "k3v2": "-.", "k2v2": ":", "k8v8": (0, (1, 3))}
DPI = 90


def style_for(label: str) -> dict:
    """Colour by method, line style by preset, from a config name such as ``kivi:k2v2``."""
    method, _, rest = label.partition(":")
    preset = rest.split("/")[0].split("+")[0]
    method = method.split("+")[0].split("/")[0]
    return {"color": METHOD_COLOURS.get(method), "linestyle": PRESET_STYLES.get(preset, "-")}


Series = dict[str, tuple[Sequence[float], Sequence[float]]]


def line_panels(
    path: str | Path,
    panels: list[tuple[str, Series]],
    xlabel: str,
    ylabel: str,
    logy: bool = False,
    suptitle: str | None = None,
    sharey: bool = True,
) -> Path:
    """Side-by-side line plots, one legend (labels are config names)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), sharey=sharey, squeeze=False)
    for ax, (title, series) in zip(axes[0], panels, strict=True):
        for label, (xs, ys) in series.items():
            pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and (not logy or y > 0)]
            if not pairs:
                continue
            ax.plot(
                [p[0] for p in pairs], [p[1] for p in pairs], label=label, linewidth=1.6, **style_for(label)
            )
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        if logy:
            ax.set_yscale("log")
    axes[0][0].set_ylabel(ylabel)
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        axes[0][-1].legend(handles, labels, fontsize=8, loc="best")
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


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
    path = Path(path)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
