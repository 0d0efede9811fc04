"""Figures and tables of the study. The only part of ``tailored`` that imports matplotlib.

Each stage has its own drawing module (``tailored.figures.graph``, ``…importance``, …); this file holds
what they share: a byte-stable PNG writer and a table writer (CSV + Markdown).
"""

from __future__ import annotations

import io
from pathlib import Path

# No backend is forced: a notebook keeps its inline backend, a headless process gets Agg by itself, and a PNG
# is rendered by Agg whichever backend draws on screen, so the saved bytes do not depend on it.
import matplotlib.pyplot as plt

from tailored.paths import atomic_write_bytes, atomic_write_text

STYLE = {"figure.dpi": 110, "savefig.dpi": 110, "font.size": 9, "axes.titlesize": 10,
         "axes.spines.top": False, "axes.spines.right": False}
plt.rcParams.update(STYLE)


def save_figure(fig, figures_dir: str | Path, name: str) -> Path:
    """Save ``fig`` as ``<figures_dir>/<name>.png`` byte-stably (no timestamp or version in the metadata)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", metadata={"Software": None})
    path = Path(figures_dir) / f"{name}.png"
    atomic_write_bytes(path, buf.getvalue())
    return path


def save_table(df, figures_dir: str | Path, name: str, floatfmt: str = ".4g") -> tuple[Path, Path]:
    """Save a pandas DataFrame as ``<name>.csv`` and ``<name>.md`` (a Markdown table for the README)."""
    figures_dir = Path(figures_dir)
    csv = figures_dir / f"{name}.csv"
    md = figures_dir / f"{name}.md"
    atomic_write_text(csv, df.to_csv(index=False, float_format=f"%{floatfmt}"))
    atomic_write_text(md, _markdown(df, floatfmt) + "\n")
    return csv, md


def _markdown(df, floatfmt: str) -> str:
    def fmt(v):
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v)

    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
    return "\n".join(lines)
