"""Shared figure conventions: model colours, titles that carry the estimator and n."""

from __future__ import annotations

import plotly.graph_objects as go

MODEL_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")
TEMPLATE = "plotly_white"


def titled(fig: go.Figure, title: str, *, estimator: str | None = None, n: int | None = None) -> go.Figure:
    """Set a title whose second line says how the numbers were computed."""
    sub = " · ".join(p for p in (estimator, f"n = {n}" if n is not None else None) if p)
    text = f"{title}<br><sup>{sub}</sup>" if sub else title
    fig.update_layout(title={"text": text}, template=TEMPLATE, margin={"t": 70})
    return fig
