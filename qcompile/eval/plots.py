"""Plots of compile reports (PNG via matplotlib's Agg backend): what people would rather look at."""

from __future__ import annotations

from typing import Any


def plot_sensitivity(notes: dict[str, Any], path: str, title: str = "") -> None:
    """Bar chart (PNG) of the per-layer sensitivity recorded in the pass notes, A8 layers highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = notes["sensitivity"]
    high = max(r["act_bits"] for r in rows)
    scores = [max(r["score"], 1e-30) for r in rows]
    colors = ["tab:red" if r["act_bits"] == high else "tab:blue" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.06), 4.5))
    ax.bar(range(len(rows)), scores, color=colors, width=1.0)
    ax.set_yscale("log")
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.set_xlabel("linear layer (graph order)")
    ax.set_ylabel(f"sensitivity ({notes.get('metric', '')}: est. loss increase / token)")
    ax.set_title(
        title
        or f"A{high} (red) for {sum(c == 'tab:red' for c in colors)} of {len(rows)} linears, "
        f"budget {notes.get('budget'):.3g} of {notes.get('unit')}"
    )
    step = max(1, len(rows) // 30)
    ax.set_xticks(range(0, len(rows), step))
    ax.set_xticklabels(
        [rows[i]["path"].removeprefix("model.") for i in range(0, len(rows), step)], rotation=90, fontsize=6
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["plot_sensitivity"]
