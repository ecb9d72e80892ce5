"""Shared figure conventions: model colours, titles that carry the estimator and n."""

from __future__ import annotations

import functools
import inspect
import re
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
                made_by = _producers(allowed)
                got = _producers((type(value),))
                raise ParameterError(
                    f"{fn.__name__} draws {'results' if many else 'a result'} of type {wanted}; got {type(value).__name__}"
                    f"{f' (from {got})' if got else ''}. Pass what {made_by or 'the matching analysis'} returns."
                )
        return fn(*args, **kwargs)

    checked.result_types = allowed  # type: ignore[attr-defined]
    return typing.cast(F, checked)


def _producers(types: tuple[type, ...]) -> str:
    """The public analysis functions whose return annotation is one of ``types`` (or a list or tuple of one), as
    "a, b or c", so that a figure given the wrong result can say which function makes the right one."""
    import importlib
    import pkgutil

    import workbench.analyses as package

    names = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, func in inspect.getmembers(module, inspect.isfunction):
            if name.startswith("_") or func.__module__ != module.__name__:
                continue
            try:
                returned = typing.get_type_hints(func).get("return")
            except Exception:  # noqa: BLE001 (an annotation that cannot be resolved names nothing)
                continue
            if returned in types or any(arg in types for arg in typing.get_args(returned)):
                names.append(f"{name}()")
    names = sorted(set(names))
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "".join(names)


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


def order_layers(fig: go.Figure, *sequences: Sequence[str], labels: Sequence[str] | None = None,
                 merge: bool = True) -> go.Figure:
    """Put every x axis of ``fig`` in the :func:`merged_order` of the models' layers (plotly would otherwise order
    categories by first appearance, so a second model's layer could be drawn after the output).

    Models whose layers cannot share one axis each get their own stretch of it, left to right in the order of
    ``sequences``: each model's categories are named ``"<label> · <layer>"`` (``labels`` default "model 1",
    "model 2"; a label that two models share gets " (1)", " (2)"), the ticks read the layer name, the model's
    name stands above its stretch (above the subplot titles, if any) and a dotted line separates the
    stretches; grouped bars are overlaid, as each category then holds one model's bar. Layers cannot share an
    axis when no single order keeps each model's forward order (a CNN's ``fc1`` after its ``relu1`` and an
    MLP's before: one shared axis would draw a line back and forth), and, with ``merge=False``, whenever the
    models' layer lists differ at all: then a shared axis would put layers of different depth at one position
    (an MLP's ``relu1`` beside another's ``tanh1``) and draw each line across the other model's layers.
    Identical lists (two seeds of one architecture) always share the axis."""
    order = merged_order(*sequences)
    identical = all(list(seq) == list(sequences[0]) for seq in sequences)
    if identical or (merge and all(keeps_order(order, seq) for seq in sequences)):
        fig.update_xaxes(categoryorder="array", categoryarray=order)
        return fig
    names = list(labels) if labels is not None else [f"model {k + 1}" for k in range(len(sequences))]
    keys = [tuple(seq) for seq in sequences]
    traces = [t for t in fig.data if getattr(t, "x", None) is not None and len(t.x)]
    owners = _owners([tuple(t.x) for t in traces], keys)
    if owners is None:  # a trace that is not one model's layers: keep a shared axis
        fig.update_xaxes(categoryorder="array", categoryarray=order)
        return fig
    shown = [f"{name} ({k + 1})" if names.count(name) > 1 else name for k, name in enumerate(names)]
    for t, k in zip(traces, owners):
        t.x = [f"{shown[k]} · {layer}" for layer in t.x]
        hover = getattr(t, "hovertemplate", None)
        if isinstance(hover, str):  # the category names the model now: hover shows it once
            t.hovertemplate = hover.replace(f"{names[k]} · %{{x}}", "%{x}")
    categories = [f"{name} · {layer}" for name, seq in zip(shown, sequences) for layer in seq]
    fig.update_xaxes(categoryorder="array", categoryarray=categories, tickmode="array", tickvals=categories,
                     ticktext=[str(layer) for seq in sequences for layer in seq], automargin=True)
    if fig.layout.barmode == "group":  # one model's bars per category: no empty slot beside each bar
        fig.update_layout(barmode="overlay")
    starts = np.concatenate([[0], np.cumsum([len(seq) for seq in sequences])])
    lift = LABEL_ROW if any(above_plot(a) for a in fig.layout.annotations) else 0  # above subplot titles
    axes = list(fig.select_xaxes())
    tops = [_domain_top(fig, axis) for axis in axes]
    for axis, top in zip(axes, tops):
        ref, yref = "x" + axis.plotly_name[len("xaxis"):], f"{axis.anchor or 'y'} domain"
        for b in starts[1:-1]:
            fig.add_shape(type="line", xref=ref, x0=b - 0.5, x1=b - 0.5, yref=yref, y0=0, y1=1,
                          line={"color": "#999", "width": 1, "dash": "dot"}, layer="below")
        if top < max(tops):  # a lower row of a column of panels: the top row names the models
            continue
        for name, lo, hi in zip(shown, starts[:-1], starts[1:]):
            fig.add_annotation(x=(lo + hi - 1) / 2, xref=ref, y=1, yref=yref, yanchor="bottom", yshift=lift,
                               text=f"<b>{name}</b>", showarrow=False, font={"size": 12})
    return fig


LABEL_ROW = 22  # pixels of a row of labels above the plot area


def above_plot(a: Any) -> bool:
    """Whether annotation ``a`` sits on top of the plot area (a subplot title, a model's name over its layers)."""
    yref = a.yref or ""
    return (yref == "paper" or yref.endswith("domain")) and a.y is not None and a.y >= 0.98 and a.yanchor == "bottom"


def _domain_top(fig: go.Figure, xaxis: Any) -> float:
    yaxis = fig.layout["yaxis" + (xaxis.anchor or "y")[1:]]
    return float(yaxis.domain[1]) if yaxis is not None and yaxis.domain is not None else 1.0


def _owners(xs: Sequence[tuple[Any, ...]], keys: Sequence[tuple[str, ...]]) -> list[int] | None:
    """Which model each trace draws, the traces taken in the order they were added (model by model), so that
    two models with the same layers are told apart; None when a trace's x is not some model's layers."""
    owners: list[int] = []
    k = 0
    for x in xs:
        match = next((j for j in range(k, len(keys)) if keys[j] == x), None)
        if match is None:
            match = next((j for j in range(len(keys)) if keys[j] == x), None)
        if match is None:
            return None
        owners.append(match)
        k = match
    return owners


def class_name(label: object, class_names: Sequence[str] | None) -> str:
    """An integer class label by its name where the dataset names its classes (``class_names[label]``), else as is."""
    if class_names is not None and isinstance(label, (int, np.integer)) and 0 <= int(label) < len(class_names):
        return str(class_names[int(label)])
    return str(label)


def nice_step(span: float, n_ticks: int = 5) -> float:
    """A tick spacing of 1, 2 or 5 times a power of ten giving about ``n_ticks`` ticks over ``span``."""
    raw = span / n_ticks
    magnitude = 10 ** np.floor(np.log10(raw))
    return float(next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * (1 - 1e-9)))


def category_color(i: int) -> str:
    """The ``i``-th categorical colour (cycling)."""
    return CATEGORY_COLORS[i % len(CATEGORY_COLORS)]


SUBTITLE_WIDTH = 68  # characters per subtitle line: fits a chart that shares the page width with another at 1280 px


def _wrap(text: str, width: int = SUBTITLE_WIDTH) -> list[str]:
    """Break ``text`` into lines of at most ``width`` characters at spaces (a longer word stays whole); an equation such
    as ``n = 450`` stays on one line."""
    lines: list[str] = []
    for word in re.split(r"(?<!=) (?!=)", text):
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


TITLE_PAD = 24  # pixels above the title
TITLE_BLOCK = 40  # pixels from the title's top to its subtitle's first line, and below the subtitle
SUBTITLE_LINE = 16  # pixels per subtitle line (plotly's 12 px font)
SUBPLOT_TITLES = 34  # pixels of subplot titles above the plot area


def title_margin(n_lines: int, *, subplot_titles: bool = False) -> int:
    """The top margin that holds the title (pinned to the top of the figure), ``n_lines`` subtitle lines below it
    and, when ``subplot_titles``, the subplot titles above the plot area."""
    return TITLE_PAD + TITLE_BLOCK + SUBTITLE_LINE * n_lines + (SUBPLOT_TITLES if subplot_titles else 0)


def titled(fig: go.Figure, title: str, *, estimator: str | None = None, n: int | None = None) -> go.Figure:
    """Set a title with a subtitle that says how the numbers were computed (wrapped, so a narrow chart shows
    all of it), with room above subplot titles.

    The title sits at the top of the figure and the top margin grows with every subtitle line, so a long note
    never reaches the plot area; a figure with a set height grows by the lines past the second, so its plot
    area keeps its size."""
    sub = " · ".join(p for p in (estimator, f"n = {n}" if n is not None else None) if p)
    lines = [line for part in sub.split("<br>") for line in _wrap(part)] if sub else []
    above = [a for a in fig.layout.annotations if above_plot(a)]
    top = title_margin(len(lines), subplot_titles=bool(above)) + max((int(a.yshift or 0) for a in above), default=0)
    fig.update_layout(
        # each line ends in a space, so that text read from the figure (copied, or by a screen reader) keeps its words apart
        title={"text": title, "subtitle": {"text": " <br>".join(lines)}, "y": 1, "yanchor": "top",
               "pad": {"t": TITLE_PAD}},
        template=TEMPLATE, margin={"t": max(top, fig.layout.margin.t or 0)},
    )
    if fig.layout.height is not None and len(lines) > 2:
        fig.update_layout(height=fig.layout.height + SUBTITLE_LINE * (len(lines) - 2))
    return fig


def figure_title(fig: go.Figure | dict[str, Any]) -> str:
    """A figure's title and subtitle as one line of text (``fig`` a figure or its JSON dict)."""
    layout = fig.to_plotly_json()["layout"] if isinstance(fig, go.Figure) else fig.get("layout", {})
    title = layout.get("title", {})
    sub = title.get("subtitle", {}).get("text") or ""
    return " · ".join(p for p in (title.get("text") or "", re.sub(r"\s*<br>\s*", " ", sub)) if p)


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
