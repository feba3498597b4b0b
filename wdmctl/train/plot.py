"""The loss curve, drawn with matplotlib (the optional `plot` extra: `pip install 'wdmctl[plot]'`)."""

from __future__ import annotations

import io
import math
from pathlib import Path

from wdmctl.core.io import write_bytes_atomic


def matplotlib_pyplot():
    """pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib  # here: an optional dependency, and a slow import that only plotting needs
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log_y_axis(ax) -> None:
    """A log y axis labelled in plain numbers ("40", "0.05"), not matplotlib's "4x10^1": FID and loss
    curves often span less than a decade, where the default labels only minor ticks, in that notation. Within
    a decade every tick is labelled, with one at 1.5x each power of ten, so that a range such as 33-145 has
    a label above 100; across more, only the 1-2-5 ticks."""
    from matplotlib.ticker import FuncFormatter, LogLocator  # matplotlib is optional: only plotting imports it

    ax.set_yscale("log")
    ax.yaxis.set_minor_locator(LogLocator(subs=(1.5, 2, 3, 4, 5, 6, 7, 8, 9)))

    def label(value: float, _position) -> str:
        if value <= 0:
            return ""
        low, high = ax.get_ylim()
        mantissa = float(f"{value:e}".split("e")[0])   # 150 -> 1.5, 0.05 -> 5.0: exact, unlike log10
        return f"{value:g}" if high / low < 10 or mantissa in (1.0, 2.0, 5.0) else ""

    ax.yaxis.set_major_formatter(FuncFormatter(label))
    ax.yaxis.set_minor_formatter(FuncFormatter(label))


def plot_loss(steps: list[int], losses: list[float], path: str | Path, title: str = "training loss") -> bool:
    """Loss against step on a log axis, as a PNG written atomically. Non-finite and non-positive losses
    (skipped steps) are left out. False, and nothing written, without matplotlib."""
    plt = matplotlib_pyplot()
    if plt is None:
        return False
    points = [(s, loss) for s, loss in zip(steps, losses)
              if loss is not None and math.isfinite(loss) and loss > 0]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    try:
        if points:
            ax.plot([s for s, _ in points], [loss for _, loss in points], color="navy", linewidth=1.5,
                    marker="o" if len(points) == 1 else None)
            log_y_axis(ax)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png")
    finally:
        plt.close(fig)
    write_bytes_atomic(path, png.getbuffer())
    return True
