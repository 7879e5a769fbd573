"""The PNG bar chart of a results document (matplotlib, imported only when a chart is drawn):
per (backend, dtype, elements) panel, the GB/s of fastopt and of each peer, per case."""

import numpy as np

from ..fileio import atomic_write
from .settings import CPU_BACKEND

CHART_PEERS = ("roofline", "numpy", "torch_foreach", "torch_fused")
"""The peers drawn next to fastopt (the many-parameter peers are left to the tables)."""
CHART_DPI = 100
CHART_PANEL_HEIGHT_PX = 360
CHART_MIN_WIDTH_PX = 900
CHART_PX_PER_CASE = 70


def chart_panels(doc):
    """[((backend, dtype, elements), [case results])] in first-seen order: one chart panel each."""
    panels = {}
    for c in doc["cases"]:
        key = (c.get("backend", CPU_BACKEND), c["dtype"], c["elements"])
        panels.setdefault(key, []).append(c)
    return list(panels.items())


def chart_size(doc):
    """(width, height) in pixels of :func:`plot_chart`'s PNG: one panel per (backend, dtype,
    elements), ``CHART_PANEL_HEIGHT_PX`` high; ``max(CHART_MIN_WIDTH_PX, CHART_PX_PER_CASE x the
    most cases in a panel + 200)`` wide."""
    panels = chart_panels(doc)
    most = max((len(cs) for _, cs in panels), default=1)
    width = max(CHART_MIN_WIDTH_PX, CHART_PX_PER_CASE * most + 200)
    return width, CHART_PANEL_HEIGHT_PX * max(1, len(panels))


def plot_chart(doc, path):
    """Write a PNG bar chart of the results: per (backend, dtype, elements) panel, the GB/s of
    fastopt and of each peer (the same bytes / the peer's time) per case, log scale, with the
    fraction of roofline printed over fastopt's bar. Returns (width, height) in pixels.
    Needs matplotlib (``pip install 'fastopt[plot]'``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width, height = chart_size(doc)
    panels = chart_panels(doc)
    fig, axes = plt.subplots(
        max(1, len(panels)),
        1,
        figsize=(width / CHART_DPI, height / CHART_DPI),
        dpi=CHART_DPI,
        squeeze=False,
    )
    colors = {
        "fastopt": "#1f77b4",
        "roofline": "#7f7f7f",
        "numpy": "#2ca02c",
        "torch_foreach": "#ff7f0e",
        "torch_fused": "#d62728",
    }
    series = ("fastopt",) + CHART_PEERS
    for ax, ((backend, dtype, elements), cases) in zip(axes[:, 0], panels):
        x = np.arange(len(cases))
        present = [s for s in series if s == "fastopt" or any(s in c["timings"] for c in cases)]
        w = 0.8 / len(present)
        for j, s in enumerate(present):
            vals = []
            for c in cases:
                t = c["timings"].get(s, {}).get("median_s")
                vals.append(c["bytes_per_element"] * c["elements"] / t / 1e9 if t else np.nan)
            bars = ax.bar(x + (j - (len(present) - 1) / 2) * w, vals, w, label=s, color=colors[s])
            if s == "fastopt":
                for b, c in zip(bars, cases):
                    f = c.get("fraction_of_roofline")
                    if f is not None and np.isfinite(b.get_height()):
                        ax.annotate(
                            f"{f:.2f}",
                            (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center",
                            va="bottom",
                            fontsize=7,
                        )
        ax.set_yscale("log")
        finite = [
            b.get_height()
            for container in ax.containers
            for b in container
            if np.isfinite(b.get_height()) and b.get_height() > 0
        ]
        if finite:  # headroom for the legend and the labels above the bars
            ax.set_ylim(min(finite) / 2, max(finite) * 12)
        ax.set_xticks(x)
        ax.set_xticklabels([c["case"] for c in cases], rotation=30, ha="right", fontsize=8)
        params = {c.get("params", 1) for c in cases}
        what = f"{elements:,} elements" + (
            f" in {max(params)} params" if max(params) > 1 and len(params) == 1 else ""
        )
        ax.set_title(
            f"{backend}, {dtype}, {what}: GB/s (number: fraction of roofline)", fontsize=10
        )
        ax.set_ylabel("GB/s")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=len(present), loc="upper center", frameon=False)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, dpi=CHART_DPI, format="png")
    plt.close(fig)
    return width, height
