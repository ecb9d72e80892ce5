"""Shared figure conventions: model colours, titles that carry the estimator and n."""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import plotly.graph_objects as go

from workbench.errors import ParameterError

MODEL_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")
TEMPLATE = "plotly_white"
# categorical colours (classes, layers): plotly's default ten, then ten more distinct ones
CATEGORY_COLORS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363",
)


F = TypeVar("F", bound=Callable[..., Any])


def takes_results(fn: F) -> F:
    """Check the result argument(s) of a figure or table helper against its annotation, so that a wrong
    object gets one sentence naming the expected result type instead of an AttributeError deep inside."""
    first = next(iter(inspect.signature(fn).parameters.values()))
    expected = typing.get_type_hints(fn)[first.name]
    allowed = tuple(t for t in (typing.get_args(expected) or (expected,)) if isinstance(t, type))
    wanted = " or ".join(t.__name__ for t in allowed if t is not type(None))
    many = first.kind is inspect.Parameter.VAR_POSITIONAL

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        given = args if many else (args[:1] if args else (kwargs[first.name],) if first.name in kwargs else ())
        for value in given:
            if not isinstance(value, allowed):
                raise ParameterError(
                    f"{fn.__name__} draws {'results' if many else 'a result'} of type {wanted}; got {type(value).__name__}. "
                    "Pass what the matching analysis returns."
                )
        return fn(*args, **kwargs)

    checked.result_types = allowed  # type: ignore[attr-defined]
    return typing.cast(F, checked)


def merged_order(*sequences: Sequence[str]) -> list[str]:
    """One category order that keeps each sequence's own order where they agree (the layers of two models on a
    shared axis): a name not seen yet goes just before the next name of its sequence that is already placed."""
    order: list[str] = []
    for seq in sequences:
        for k, name in enumerate(seq):
            if name in order:
                continue
            later = next((order.index(n) for n in seq[k + 1:] if n in order), len(order))
            order.insert(later, name)
    return order


def keeps_order(order: Sequence[str], seq: Sequence[str]) -> bool:
    """Whether the names of ``seq`` come in ``order`` in the order ``seq`` has them."""
    positions = [order.index(name) for name in seq]
    return all(p < q for p, q in zip(positions, positions[1:]))


def order_layers(fig: go.Figure, *sequences: Sequence[str], labels: Sequence[str] | None = None) -> go.Figure:
    """Put every x axis of ``fig`` in the :func:`merged_order` of the models' layers (plotly would otherwise order
    categories by first appearance, so a second model's layer could be drawn after the output).

    When no single order keeps each model's forward order (two architectures that share layer names in another
    order, such as a CNN's ``fc1`` after its ``relu1`` and an MLP's before), each model gets its own stretch of
    the axis, its layers named ``"<label> · <layer>"`` (``labels`` default "model 1", "model 2") in its own
    order: one shared axis would draw a line back and forth between layers."""
    order = merged_order(*sequences)
    if all(keeps_order(order, seq) for seq in sequences):
        fig.update_xaxes(categoryorder="array", categoryarray=order)
        return fig
    names = list(labels) if labels is not None else [f"model {k + 1}" for k in range(len(sequences))]
    keys = [tuple(seq) for seq in sequences]
    traces = [t for t in fig.data if getattr(t, "x", None) is not None and len(t.x)]
    if not all(tuple(t.x) in keys for t in traces):  # a trace that is not one model's layers: keep a shared axis
        fig.update_xaxes(categoryorder="array", categoryarray=order)
        return fig
    for t in traces:
        t.x = [f"{names[keys.index(tuple(t.x))]} · {layer}" for layer in t.x]
    fig.update_xaxes(categoryorder="array",
                     categoryarray=[f"{name} · {layer}" for name, seq in zip(names, sequences) for layer in seq])
    return fig


def class_name(label: object, class_names: Sequence[str] | None) -> str:
    """An integer class label by its name where the dataset names its classes (``class_names[label]``), else as is."""
    if class_names is not None and isinstance(label, (int, np.integer)) and 0 <= int(label) < len(class_names):
        return str(class_names[int(label)])
    return str(label)


def category_color(i: int) -> str:
    """The ``i``-th categorical colour (cycling)."""
    return CATEGORY_COLORS[i % len(CATEGORY_COLORS)]


SUBTITLE_WIDTH = 90  # characters per subtitle line: fits a chart that shares the page width with another


def _wrap(text: str, width: int = SUBTITLE_WIDTH) -> list[str]:
    """Break ``text`` into lines of at most ``width`` characters at spaces (a longer word stays whole)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def titled(fig: go.Figure, title: str, *, estimator: str | None = None, n: int | None = None) -> go.Figure:
    """Set a title with a subtitle that says how the numbers were computed (wrapped, so a narrow chart shows
    all of it), with room above subplot titles."""
    sub = " · ".join(p for p in (estimator, f"n = {n}" if n is not None else None) if p)
    lines = _wrap(sub) if sub else []
    subplot_titles = any(a.yref == "paper" and a.y is not None and a.y >= 0.98 and a.yanchor == "bottom"
                         for a in fig.layout.annotations)
    top = 56 + 15 * len(lines) + (34 if subplot_titles else 0)
    fig.update_layout(title={"text": title, "subtitle": {"text": "<br>".join(lines)}}, template=TEMPLATE,
                      margin={"t": max(top, fig.layout.margin.t or 0)})
    return fig


def figure_title(fig: go.Figure | dict[str, Any]) -> str:
    """A figure's title and subtitle as one line of text (``fig`` a figure or its JSON dict)."""
    layout = fig.to_plotly_json()["layout"] if isinstance(fig, go.Figure) else fig.get("layout", {})
    title = layout.get("title", {})
    sub = title.get("subtitle", {}).get("text") or ""
    return " · ".join(p for p in (title.get("text") or "", sub.replace("<br>", " ")) if p)


def grouped_bar_panels(fig: go.Figure, x: Sequence[str], series: Sequence[tuple[str, str]],
                       panels: Sequence[Sequence[Sequence[float] | None]]) -> go.Figure:
    """Grouped bars in side-by-side subplot columns: ``series`` is ``(name, colour)`` per bar group and
    ``panels[c][s]`` the values of series ``s`` in column ``c + 1``; each series has one legend entry."""
    for col, values_per_series in enumerate(panels, 1):
        for (name, color), values in zip(series, values_per_series, strict=True):
            fig.add_trace(
                go.Bar(x=list(x), y=values, name=name, legendgroup=name, showlegend=col == 1, marker_color=color,
                       hovertemplate=f"%{{x}} · {name}<br>%{{y:.3f}}<extra></extra>"),
                row=1,
                col=col,
            )
    fig.update_layout(barmode="group")
    return fig
