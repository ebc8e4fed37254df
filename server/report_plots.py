"""Inline SVG plots for the report (matplotlib, no files, no network to view them)."""

from __future__ import annotations

import io
import re
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
from matplotlib.ticker import MaxNLocator, NullFormatter  # noqa: E402 - the backend must be chosen first


def _svg(figure: Any, name: str) -> str:
    """The figure as SVG markup; ``name`` salts its element ids (stable per run, distinct per plot)."""
    buffer = io.StringIO()
    # Text stays text (no glyph definitions, so two inline SVGs never share an element id).
    with plt.rc_context({"svg.hashsalt": f"fedrec-{name}", "svg.fonttype": "none"}):
        figure.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(figure)
    text = buffer.getvalue()
    text = text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE: the SVG is inlined in HTML
    # matplotlib numbers ids per figure (axes_1, ...): prefix them so ids stay unique in the page.
    text = re.sub(r'\bid="([^"]+)"', rf'id="{name}-\1"', text)
    return re.sub(r'(url\(#|href="#)([^)"]+)', rf"\g<1>{name}-\2", text)


def _per_round_figure(rounds: list[dict[str, Any]], series: dict[str, str], ylabel: str) -> tuple[Any, Any] | None:
    """A figure with one line per series key present in ``rounds`` (None when none is)."""
    figure, axes = plt.subplots(figsize=(6.4, 3.2))
    drawn = False
    for label, key in series.items():
        points = [(r["round"], r[key]) for r in rounds if r.get(key) is not None]
        if points:
            axes.plot(*zip(*points, strict=True), marker="o", markersize=3, label=label)
            drawn = True
    if not drawn:
        plt.close(figure)
        return None
    axes.set_xlabel("round")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    return figure, axes


def epsilon_plot(rounds: list[dict[str, Any]], user_budget: float | None, record_budget: float | None) -> str | None:
    """Epsilon spent after each round (user-level, and record-level max / mean over devices)."""
    series = {
        "user-level epsilon": "user_epsilon",
        "record-level epsilon, max over the round's devices": "record_epsilon_max",
        "record-level epsilon, mean over the round's devices": "record_epsilon_mean",
    }
    drawn = _per_round_figure(rounds, series, "epsilon spent (cumulative)")
    if drawn is None:
        return None
    figure, axes = drawn
    for budget, label in ((user_budget, "user-level budget"), (record_budget, "per-device budget")):
        if budget:
            axes.axhline(budget, linestyle="--", linewidth=1, color="grey")
            axes.annotate(label, (0.01, budget), xycoords=("axes fraction", "data"), fontsize=8, va="bottom")
    axes.legend(fontsize=8)
    return _svg(figure, "epsilon")


def utility_plot(rounds: list[dict[str, Any]], sampled_negatives: int | None) -> str | None:
    """HR@10 and NDCG@10 (leave-one-out against sampled negatives) at each evaluated round."""
    against = f"{sampled_negatives} sampled negatives" if sampled_negatives else "sampled negatives"
    drawn = _per_round_figure(rounds, {"HR@10": "hr@10", "NDCG@10": "ndcg@10"}, f"test metric ({against})")
    if drawn is None:
        return None
    figure, axes = drawn
    axes.set_ylim(bottom=0)
    axes.legend(fontsize=8)
    return _svg(figure, "utility")


def frontier_plot(
    lines: dict[str, list[tuple[float, float]]],
    levels: dict[str, float],
    *,
    own: list[tuple[float, float]] | None = None,
    name: str = "frontier",
) -> str | None:
    """HR@10 against epsilon: one line per private mode, one level per non-private yardstick.

    ``lines`` maps a label to its (epsilon, HR@10) points; ``levels`` maps a label (ItemPop,
    no DP, centralized) to an HR@10 drawn across the plot; ``own`` is a run's trajectory
    (epsilon spent by each evaluated round, HR@10 then), its last point marked. Epsilon is
    on a log axis: budgets of interest span 0.5 to 50.
    """
    points = [p for pts in lines.values() for p in pts] + list(own or [])
    if not points:
        return None
    figure, axes = plt.subplots(figsize=(6.4, 3.8))
    for label, pts in lines.items():
        ordered = sorted(pts)
        axes.plot([e for e, _ in ordered], [h for _, h in ordered], marker="o", linewidth=1.5, label=label)
    styles = ("--", ":", "-.")
    for i, (label, level) in enumerate(sorted(levels.items(), key=lambda kv: kv[1])):
        axes.axhline(level, linestyle=styles[i % len(styles)], linewidth=1, color="grey")
        left = i % 2 == 1  # neighbouring levels are labelled at opposite ends so their labels do not overlap
        axes.annotate(f"{label} {level:.3f}", (0.01 if left else 0.99, level), xycoords=("axes fraction", "data"),
                      fontsize=7, ha="left" if left else "right", va="bottom", color="dimgrey")
    if own:
        axes.plot([e for e, _ in own], [h for _, h in own], color="black", linewidth=1, alpha=0.6)
        axes.plot([own[-1][0]], [own[-1][1]], marker="*", markersize=12, color="black", linestyle="none",
                  label=f"this run: epsilon {own[-1][0]:.2f}, HR@10 {own[-1][1]:.3f}")
    axes.set_xscale("log")
    epsilons = [e for e, _ in points]
    ticks = [t for t in (0.25, 0.5, 1, 2, 3, 5, 8, 10, 20, 50, 100) if min(epsilons) / 1.5 <= t <= max(epsilons) * 1.5]
    axes.set_xticks(ticks, [f"{t:g}" for t in ticks])
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("epsilon (log scale)")
    axes.set_ylabel("HR@10 (99 sampled negatives)")
    axes.set_ylim(0, max([h for _, h in points] + list(levels.values())) * 1.12)
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)  # below: never over a point
    return _svg(figure, name)
