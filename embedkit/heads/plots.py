"""Figures people can read: the confusion matrix of train-head and the learning curve of report.

matplotlib is imported inside each function (Agg backend, no display needed).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(matrix: np.ndarray, labels: np.ndarray, path: Path | None, title: str) -> Any:
    """A readable confusion matrix: rows normalised to the share of each true class, a colour bar,
    label fonts and figure size scaled to the number of classes, the title inside the canvas.

    Writes ``path`` (PNG) when given; returns the (closed) figure, for tests to inspect.
    """
    plt = _pyplot()
    n = len(labels)
    names = [str(v) for v in labels]
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    cell = 0.6 if n <= 10 else 0.3 if n <= 30 else 0.22  # inches per class
    font = 11 if n <= 10 else 9 if n <= 30 else 7
    label_in = max(len(t) for t in names) * font * 0.6 / 72 + 0.6  # room for the longest tick label
    side = max(3.0, cell * n)
    fig = plt.figure(figsize=(side + label_in + 1.6, side + label_in + 1.0), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    bar = fig.colorbar(image, ax=ax, fraction=0.046 if n > 10 else 0.08, pad=0.02, shrink=0.8 if n > 10 else 1.0)
    bar.set_label("share of the true class", fontsize=font)
    bar.ax.tick_params(labelsize=font)
    ticks = np.arange(n)
    ax.set_xticks(ticks, names, rotation=90, fontsize=font)
    ax.set_yticks(ticks, names, fontsize=font)
    if n <= 20:  # the numbers themselves, while the cells are big enough to hold them
        for (i, j), v in np.ndenumerate(share):
            ax.text(j, i, f"{v:.2f}\n({matrix[i, j]})", ha="center", va="center", fontsize=font - 2,
                    color="white" if v > 0.5 else "black")
    big = max(font + 1, 12 if n > 30 else 0)  # titles stay legible on a large figure
    ax.set_xlabel("predicted", fontsize=big)
    ax.set_ylabel("true", fontsize=big)
    ax.set_title(f"{title}\nconfusion matrix, rows normalised ({n} classes)", fontsize=big + 2 if n > 30 else big,
                 wrap=True)
    if path is not None:
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig


def plot_learning_curve(rows: list[dict[str, Any]], path: Path | None, title: str) -> Any:
    """Held-out accuracy and training time vs labelled items, one line per model; the title
    wrapped inside the canvas. Writes ``path`` (PNG) when given; returns the (closed) figure."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5), layout="constrained")
    for model in dict.fromkeys(r["model"] for r in rows):
        points: dict[int, list[dict[str, Any]]] = {}
        for r in rows:
            if r["model"] == model:
                points.setdefault(r["train_items"], []).append(r)
        xs = sorted(points)
        left.plot(xs, [np.mean([p["accuracy"] for p in points[x]]) for x in xs], marker="o", label=model)
        right.plot(xs, [np.mean([p["train_seconds"] for p in points[x]]) for x in xs], marker="o", label=model)
    from matplotlib.ticker import FuncFormatter, NullFormatter

    sizes = sorted({r["train_items"] for r in rows})
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 128, not 2^7; 0.5, not 5x10^-1
    right.set_yscale("log")
    for ax, label in ((left, "held-out accuracy"), (right, "training time (s, log scale)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(x) for x in sizes], fontsize=9)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("labelled training items (1, 2, 4, ... per class, then all)", fontsize=10)
        ax.set_ylabel(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    right.yaxis.set_major_formatter(plain)
    right.yaxis.set_minor_formatter(plain)
    right.tick_params(axis="y", which="minor", labelsize=8)
    left.set_ylim(0, 1.02)
    fig.suptitle(title, fontsize=12, wrap=True)
    if path is not None:
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig
