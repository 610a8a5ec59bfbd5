"""Figures: matplotlib without a display, and every figure saved as a PNG (200 dpi) with a vector
PDF beside it — the one place both choices are made."""
from __future__ import annotations

from pathlib import Path

DPI = 200


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only; no display needed)."""
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    return plt


def save(fig, path) -> Path:
    """Write `fig` to `path` (.png) and the same name with .pdf, then close it; returns the PNG path."""
    plt = pyplot()
    path = Path(path).with_suffix(".png")
    fig.savefig(path, dpi=DPI)
    fig.savefig(path.with_suffix(".pdf"))
    plt.close(fig)
    return path
