"""Linear mode connectivity and permutation alignment of two (or more) networks.

Two networks trained from different seeds usually sit in different basins: the straight line
``(1 - λ) θ_A + λ θ_B`` between their weights passes through a region of high loss (a *barrier*).
Hidden units can be reordered without changing the function a network computes, so before
interpolating, model B can be permuted to line up with model A:

* :func:`weight_matching` (Ainsworth, Hayase & Srinivasa, "Git Re-Basin", 2023) maximises
  ``Σ ⟨θ_A, π(θ_B)⟩`` over permutations by coordinate descent, one linear assignment per permutation;
* :func:`activation_matching` matches units by the correlation of their activations on data.

:func:`permutation_spec` derives which weight axes share a permutation by tracing the module graph
(``torch.fx``): MLPs, CNNs (with BatchNorm), residual networks. :func:`interpolate` evaluates loss and
accuracy along the line, optionally resetting BatchNorm statistics or applying REPAIR (Jordan et al.
2022); :func:`loss_barrier` reports both common barrier definitions. :func:`layer_alignment` is the
analysis of Ito et al. (2024): per-layer distances, singular values (unchanged by permutation) and
alignment of the top singular vectors. :func:`merge` aligns three or more models to a common basis
(MergeMany) and averages them; :func:`to_safetensors` exports a permuted or merged model.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from scipy.optimize import linear_sum_assignment
from torch import nn

from workbench.activations.capture import exclusive, private_copy
from workbench.analyses._result import RecordedResult
from workbench.analyses._validation import (
    check_choice,
    check_float,
    check_int,
    check_progress,
    check_seed,
)
from workbench.device import float64_device, full_float32, resolve_device, rows_on
from workbench.errors import ArchitectureError, DataError, ParameterError, did_you_mean, format_choices
from workbench.models.loading import eval_mode

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None] | None

REPAIR_MODES = ("reset_bn", "repair")
MERGE_METHODS = ("weight_matching", "activation_matching")
CONNECTIVITY_METHODS = ("naive", "weight_matching", "activation_matching", "repair", "reset_bn")
BARRIER_DEFINITIONS = {
    "linear": "max over λ of L(λ) − ((1−λ)·L_A + λ·L_B): loss above the straight line between the endpoint losses",
    "mean": "max over λ of L(λ) − ½(L_A + L_B): loss above the mean endpoint loss (λ = 0 and 1 included, so at least "
            "half the gap between the endpoint losses, reached at the worse endpoint on a flat path)",
    "accuracy_drop": "max over λ of ((1−λ)·acc_A + λ·acc_B) − acc(λ): accuracy below the straight line",
}
_REPAIR_EPS = 1e-5

# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class PermutationSpec:
    """Which weight axes share a permutation of hidden units.

    ``axes`` maps each state-dict entry (parameter or buffer name) to one entry per tensor axis: the
    name of the permutation acting on that axis, or ``None`` when the axis is not permuted (inputs,
    logits, kernel dimensions). Entries missing from ``axes`` are treated as not permuted. Example
    for a two-layer MLP::

        PermutationSpec({"fc1.weight": ("P_fc1", None), "fc1.bias": ("P_fc1",),
                         "out.weight": (None, "P_fc1"), "out.bias": (None,)})

    :func:`permutation_spec` derives it from a model; write one by hand for models it cannot trace.
    """

    axes: Mapping[str, tuple[str | None, ...]]

    @property
    def perms(self) -> dict[str, list[tuple[str, int]]]:
        """Permutation name -> the ``(state-dict entry, axis)`` pairs it acts on."""
        out: dict[str, list[tuple[str, int]]] = {}
        for key, axes in self.axes.items():
            for axis, name in enumerate(axes):
                if name is not None:
                    out.setdefault(name, []).append((key, axis))
        return out

    @property
    def perm_names(self) -> list[str]:
        """Names of all permutations, in order of first use."""
        return list(self.perms)


@dataclass(frozen=True)
class WeightMatchingResult(RecordedResult):
    """Permutations of model B's hidden units that best align its weights with model A's.

    ``permutations[p][i]`` is the unit of B that takes position ``i`` (apply with
    :func:`apply_permutation`). ``objective[t]`` is ``Σ ⟨θ_A, π_t(θ_B)⟩`` over the weights (not
    BatchNorm statistics) after pass ``t`` (``objective[0]``: identity), non-decreasing.
    ``n_samples`` is 0: no data is used.
    """

    permutations: dict[str, np.ndarray]
    perm_sizes: dict[str, int]
    objective: np.ndarray
    n_iterations: int
    converged: bool


@dataclass(frozen=True)
class ActivationMatchingResult(RecordedResult):
    """Permutations of model B's hidden units that maximise the correlation of activations with A's.

    ``permutations`` as in :class:`WeightMatchingResult`. ``correlation_before[p]`` and
    ``correlation_after[p]`` are the mean Pearson correlation (in [-1, 1]) between unit ``i`` of A and
    unit ``i`` of B, averaged over units and over every activation that carries permutation ``p``,
    before and after matching. Pairs in which a unit is constant on the dataset (a dead ReLU) have no
    correlation and are left out of the mean (nan when no pair is left).
    """

    permutations: dict[str, np.ndarray]
    perm_sizes: dict[str, int]
    correlation_before: dict[str, float]
    correlation_after: dict[str, float]


@dataclass(frozen=True)
class InterpolationResult(RecordedResult):
    """Loss and accuracy of the models ``(1 − λ) θ_A + λ θ_B`` for ``λ`` in ``lambdas``.

    ``lambdas``: ``(n_points,)`` from 0 (model A) to 1 (model B). ``loss[split]`` (mean
    cross-entropy, nats) and ``accuracy[split]`` (in [0, 1]): ``(n_points,)`` for each split
    (``"test"``: the evaluation dataset; ``"train"``: the training dataset when given).
    ``repair`` says how activation statistics were corrected at each λ (``"none"``, ``"reset_bn"``,
    ``"repair"``).
    """

    lambdas: np.ndarray
    loss: dict[str, np.ndarray]
    accuracy: dict[str, np.ndarray]
    repair: str


@dataclass(frozen=True)
class BarrierResult(RecordedResult):
    """Loss barriers of an interpolation curve, per split, under both common definitions.

    ``linear[split]``: ``max_λ L(λ) − ((1−λ) L_A + λ L_B)`` (nats, ≥ 0 since the endpoints are on
    the curve; 0 when the curve nowhere rises above the straight line between the endpoint losses);
    ``mean[split]``: ``max_λ L(λ) − ½(L_A + L_B)`` (nats, ≥ ½|L_A − L_B|, since the worse endpoint is on
    the curve; 0 only when both endpoint losses are equal and nothing in between is higher).
    ``accuracy_drop[split]``: ``max_λ ((1−λ) acc_A + λ acc_B) − acc(λ)``. ``lambda_linear`` and
    ``lambda_mean``: where each maximum is reached. ``definitions`` spells out each definition.
    """

    linear: dict[str, float]
    mean: dict[str, float]
    accuracy_drop: dict[str, float]
    lambda_linear: dict[str, float]
    lambda_mean: dict[str, float]
    definitions: dict[str, str]


@dataclass(frozen=True)
class LayerAlignmentResult(RecordedResult):
    """Per-layer comparison of model A with model B before and after permuting B (Ito et al. 2024).

    ``layers``: modules owning a weight matrix (conv kernels are read as ``(out, in·k·k)``).
    ``distance_before`` / ``distance_after``: ``(n_layers,)`` Frobenius distance ``‖θ_A − θ_B‖``
    over the layer's parameters (weight and bias). ``singular_values_a[layer]``,
    ``singular_values_b[layer]``: descending singular values of the weight matrix;
    ``singular_value_change``: ``(n_layers,)`` max |σ(B) − σ(π(B))| (0 up to rounding, since a
    permutation is orthogonal). ``alignment_before`` / ``alignment_after``: ``(n_layers,)`` mean over
    the top ``k`` components of ``|⟨u_i^A, u_i^B⟩ · ⟨v_i^A, v_i^B⟩|`` (the cosine between the
    rank-one components ``u_i v_iᵀ``; in [0, 1], 1 = identical directions);
    ``component_alignment_before[layer]`` / ``..._after[layer]``: the ``(k,)`` per-component values.
    ``top_k``: the number of components asked for; ``n_components[layer]``: the ``k`` compared in
    that layer, ``min(top_k, min(rows, columns))`` of its weight matrix.
    """

    layers: tuple[str, ...]
    distance_before: np.ndarray
    distance_after: np.ndarray
    singular_values_a: dict[str, np.ndarray]
    singular_values_b: dict[str, np.ndarray]
    singular_value_change: np.ndarray
    alignment_before: np.ndarray
    alignment_after: np.ndarray
    component_alignment_before: dict[str, np.ndarray]
    component_alignment_after: dict[str, np.ndarray]
    top_k: int
    n_components: dict[str, int]


@dataclass(frozen=True)
class MergeResult(RecordedResult):
    """Several models aligned to a common basis and averaged, evaluated against its members.

    ``names``: the members. ``member_loss`` / ``member_accuracy``: ``(n_models,)`` on the evaluation
    dataset; ``merged_*``: the average of the aligned members; ``naive_*``: the plain average without
    alignment. ``permutations[m]``: the permutations applied to member ``m`` (see
    :func:`merged_model`). ``objective``: ``(n_rounds + 1,)`` the alignment objective
    ``Σ_{i<j} ⟨π_i θ_i, π_j θ_j⟩`` before the first and after each round; ``n_rounds``: rounds run;
    ``reset_bn``: whether BatchNorm statistics of the averaged models were recomputed.
    """

    names: tuple[str, ...]
    method: str
    member_loss: np.ndarray
    member_accuracy: np.ndarray
    merged_loss: float
    merged_accuracy: float
    naive_loss: float
    naive_accuracy: float
    permutations: tuple[dict[str, np.ndarray], ...]
    objective: np.ndarray
    n_rounds: int
    reset_bn: bool


@dataclass(frozen=True)
class ModeConnectivityResult(RecordedResult):
    """Everything the mode-connectivity page shows for one pair of models.

    ``curves[method]``: interpolation curves for each alignment method (``"naive"``,
    ``"weight_matching"``, ``"activation_matching"``, ``"repair"`` = weight matching + REPAIR,
    ``"reset_bn"`` = weight matching + BatchNorm reset); ``barriers[method]``: their barriers;
    ``layers``: :class:`LayerAlignmentResult` for weight matching; ``weight_matching`` and
    ``activation_matching``: the matchings (``None`` when not run).
    """

    curves: dict[str, InterpolationResult]
    barriers: dict[str, BarrierResult]
    layers: LayerAlignmentResult
    weight_matching: WeightMatchingResult
    activation_matching: ActivationMatchingResult | None



# ---------------------------------------------------------------------------------------------
# Input checks


def _module(model: Any, name: str, func: str) -> nn.Module:
    """The ``nn.Module`` of a ``LoadedModel`` (anything with ``.module``) or of a plain module."""
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module):
        return inner
    raise ParameterError(
        f"{func}: '{name}' must be a loaded model (workbench.load_model) or a torch nn.Module. Got {type(model).__name__}."
    )


def _model_name(model: Any, default: str) -> str:
    name = getattr(model, "name", None)
    return name if isinstance(name, str) and name else default



def _check_same_architecture(
    a: nn.Module, b: nn.Module, func: str, names: tuple[str, str] = ("model_a", "model_b")
) -> None:
    """Raise :class:`ArchitectureError` naming the first module or parameter where ``b`` differs from ``a``."""
    mods_a = [(n, type(m).__name__) for n, m in a.named_modules()]
    mods_b = [(n, type(m).__name__) for n, m in b.named_modules()]
    if mods_a != mods_b:
        for (na, ta), (nb, tb) in zip(mods_a, mods_b):
            if (na, ta) != (nb, tb):
                raise ArchitectureError(
                    f"{func}: {names[0]} and {names[1]} have different architectures: module '{na}' ({ta}) in {names[0]} "
                    f"is '{nb}' ({tb}) in {names[1]}; compare models of the same architecture."
                )
        longer, extra = (
            (names[0], mods_a[len(mods_b)]) if len(mods_a) > len(mods_b) else (names[1], mods_b[len(mods_a)])
        )
        raise ArchitectureError(
            f"{func}: {names[0]} and {names[1]} have different architectures: only {longer} has module '{extra[0]}' "
            f"({extra[1]}); compare models of the same architecture."
        )
    sa, sb = a.state_dict(), b.state_dict()
    for key, ta in sa.items():
        if key not in sb:
            raise ArchitectureError(
                f"{func}: {names[0]} and {names[1]} have different architectures: parameter '{key}' is missing from "
                f"{names[1]}; compare models of the same architecture."
            )
        if tuple(ta.shape) != tuple(sb[key].shape):
            raise ArchitectureError(
                f"{func}: {names[0]} and {names[1]} have different architectures: parameter '{key}' has shape "
                f"{tuple(ta.shape)} in {names[0]} but {tuple(sb[key].shape)} in {names[1]}; compare models of the same architecture."
            )
    for key in sb:
        if key not in sa:
            raise ArchitectureError(
                f"{func}: {names[0]} and {names[1]} have different architectures: parameter '{key}' is missing from "
                f"{names[0]}; compare models of the same architecture."
            )


def same_architecture(model_a: Any, model_b: Any) -> bool:
    """Whether two models (``LoadedModel`` or ``nn.Module``) have the same modules and parameter shapes, so
    that they can be matched, interpolated and merged."""
    a, b = (getattr(m, "module", m) for m in (model_a, model_b))
    try:
        _check_same_architecture(a, b, "same_architecture")
    except ArchitectureError:
        return False
    return True


def _check_finite_weights(module: nn.Module, name: str, func: str) -> None:
    for key, t in module.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DataError(
                f"{func}: parameter '{key}' of {name} contains NaN or infinite values; check the checkpoint."
            )


def _check_dataset(dataset: Any, name: str, func: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and integer class labels of a labelled classification dataset."""
    x = getattr(dataset, "x", None)
    y = getattr(dataset, "y", None)
    if not isinstance(x, torch.Tensor):
        raise ParameterError(
            f"{func}: '{name}' must be a Dataset (workbench.data.load_dataset). Got {type(dataset).__name__}."
        )
    called = f"dataset '{getattr(dataset, 'name', '') or '?'}' ({name})"
    if y is None:
        raise DataError(
            f"{func}: {called} has no labels, but loss and accuracy need class labels; load a labelled dataset."
        )
    if y.dtype.is_floating_point:
        raise DataError(f"{func}: {called} has continuous targets, but loss and accuracy need integer class labels.")
    if x.shape[0] < 1:
        raise DataError(f"{func}: {called} is empty; it needs at least one sample.")
    return x, y


def _check_runs(module: nn.Module, dataset: Any, name: str, func: str) -> None:
    """The model must run on one sample of ``dataset`` (the feature count must fit its input)."""
    x = getattr(dataset, "x", None)
    if not isinstance(x, torch.Tensor) or x.shape[0] < 1:
        return
    param = next(module.parameters(), None)
    xb = rows_on(x, 0, 1, param.device, param.dtype) if param is not None else rows_on(x, 0, 1, torch.device("cpu"))
    try:
        with exclusive(module), torch.no_grad(), eval_mode(module):
            module(xb)
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        if not x.is_floating_point():
            raise DataError(
                f"{func}: dataset '{getattr(dataset, 'name', '?')}' ({name}) holds integer token ids, but the model takes "
                "float features; use a dataset made for this model."
            ) from exc
        raise DataError(
            f"{func}: the model could not run on dataset '{getattr(dataset, 'name', '?')}' ({name}, inputs of shape "
            f"{tuple(x.shape[1:])}: {str(exc).splitlines()[0][:160]}); use a dataset made for this model (its features must "
            "fit the model's input)."
        ) from exc


def _check_spec(spec: Any, state: Mapping[str, torch.Tensor], func: str) -> dict[str, int]:
    """Validate a spec against a state dict; return permutation name -> size."""
    if not isinstance(spec, PermutationSpec):
        raise ParameterError(
            f"The 'spec' parameter of {func} must be a PermutationSpec or None. Got {type(spec).__name__}."
        )
    sizes: dict[str, int] = {}
    for key, axes in spec.axes.items():
        if key not in state:
            raise ArchitectureError(
                f"{func}: the permutation spec names '{key}', which the model does not have.{did_you_mean(key, state)} "
                f"Entries: {format_choices(state)}."
            )
        shape = tuple(state[key].shape)
        if len(axes) != len(shape):
            raise ArchitectureError(
                f"{func}: the permutation spec gives {len(axes)} axes for '{key}', which has shape {shape}; give one entry per axis."
            )
        for axis, perm in enumerate(axes):
            if perm is None:
                continue
            if sizes.setdefault(perm, shape[axis]) != shape[axis]:
                raise ArchitectureError(
                    f"{func}: permutation '{perm}' of the spec acts on axes of sizes {sizes[perm]} and {shape[axis]} "
                    f"(axis {axis} of '{key}'); a permutation must act on axes of one size."
                )
    return sizes


def _check_permutations(perms: Any, sizes: Mapping[str, int], func: str) -> dict[str, torch.Tensor]:
    """Validate ``{name: permutation}`` (or a matching result) against ``sizes``; return int64 tensors."""
    if hasattr(perms, "permutations") and not isinstance(perms, Mapping):
        perms = perms.permutations
    if not isinstance(perms, Mapping):
        raise ParameterError(
            f"The 'permutations' parameter of {func} must be a dict of permutation name -> index array, or a matching result. "
            f"Got {type(perms).__name__}."
        )
    out: dict[str, torch.Tensor] = {}
    for name, perm in perms.items():
        if name not in sizes:
            raise ParameterError(
                f"{func}: unknown permutation '{name}'.{did_you_mean(str(name), sizes)} Permutations of this model: {format_choices(sizes)}."
            )
        arr = perm.detach().cpu().numpy() if isinstance(perm, torch.Tensor) else np.asarray(perm)
        n = sizes[name]
        if (
            arr.ndim != 1
            or arr.shape[0] != n
            or arr.dtype.kind not in "iu"
            or not np.array_equal(np.sort(arr), np.arange(n))
        ):
            raise ParameterError(
                f"{func}: permutation '{name}' must be a reordering of 0..{n - 1} (an integer array of length {n}). "
                f"Got an array of shape {arr.shape} and dtype {arr.dtype}."
            )
        out[name] = torch.from_numpy(arr.astype(np.int64))
    return out


# ---------------------------------------------------------------------------------------------
# Permutation spec by tracing the module graph

_FIXED = 0  # union-find element for "not permuted" (network inputs and outputs)

_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)
_POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
_CONV_MODULES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_MODULES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CHANNEL_NORM_MODULES: tuple[type[nn.Module], ...] = _BN_MODULES + (
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
_SUPPORTED_MODULES: tuple[type[nn.Module], ...] = (
    (nn.Linear, nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.PReLU, nn.Flatten, nn.Unflatten)
    + _ELEMENTWISE_MODULES
    + _POOL_MODULES
    + _CONV_MODULES
    + _CHANNEL_NORM_MODULES
)
_ELEMENTWISE_FUNCTIONS: frozenset[Any] = frozenset(
    {
        torch.relu,
        torch.tanh,
        torch.sigmoid,
        torch.neg,
        operator.neg,
        torch.nn.functional.relu,
        torch.nn.functional.relu6,
        torch.nn.functional.leaky_relu,
        torch.nn.functional.gelu,
        torch.nn.functional.silu,
        torch.nn.functional.elu,
        torch.nn.functional.tanh,
        torch.nn.functional.sigmoid,
        torch.nn.functional.dropout,
        torch.nn.functional.softplus,
        torch.nn.functional.mish,
        torch.nn.functional.hardswish,
    }
)
_ELEMENTWISE_METHODS = frozenset({"relu", "tanh", "sigmoid", "neg", "contiguous", "clone", "detach"})
_BINARY_FUNCTIONS: frozenset[Any] = frozenset(
    {
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        operator.iadd,
        operator.isub,
        operator.imul,
        torch.add,
        torch.sub,
        torch.mul,
        torch.div,
    }
)
_BINARY_METHODS = frozenset({"add", "sub", "mul", "div", "add_", "mul_"})


@dataclass
class _Site:
    """Permutation group and layout of a traced value: ``features`` (last axis), ``channels``
    (axis 1 with spatial extent) or ``pooled`` (axis 1, spatial extent 1)."""

    group: int
    kind: str = "features"


@dataclass
class _Graph:
    """What tracing found: the spec, permuted activations (for activation matching) and REPAIR sites."""

    spec: PermutationSpec
    node_sites: dict[str, tuple[str, str]]  # fx node name -> (permutation, kind)
    repair_sites: list[tuple[str, str]]  # module path -> kind, in execution order
    graph_module: fx.GraphModule


class _UnionFind:
    def __init__(self) -> None:
        self.parent = [0]

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> int:
        ri, rj = self.find(i), self.find(j)
        if ri == rj:
            return ri
        keep, drop = (ri, rj) if ri < rj else (rj, ri)  # the fixed element 0 and older groups win
        self.parent[drop] = keep
        return keep


def _unsupported(func: str, what: str) -> ArchitectureError:
    return ArchitectureError(
        f"{func} cannot derive which weights share a permutation: {what}. Supported: MLPs, CNNs with BatchNorm and "
        "residual networks; pass a hand-written PermutationSpec as spec= for other models."
    )


def _trace(module: nn.Module, func: str) -> _Graph:
    """Trace ``module`` with torch.fx and propagate permutation groups through the graph."""
    tracer = fx.Tracer()
    bad = [
        f"'{name}' ({type(m).__name__})"
        for name, m in module.named_modules()
        if name
        and not isinstance(m, _SUPPORTED_MODULES)
        and tracer.is_leaf_module(m, name)
        and not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))
        and (any(True for _ in m.parameters()) or any(True for _ in m.buffers()))
    ]
    if bad:
        raise _unsupported(func, f"unsupported module {format_choices(bad, limit=5)}")
    try:
        graph = tracer.trace(module)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, NotImplementedError, ...)
        raise _unsupported(func, f"torch.fx could not trace the model ({type(exc).__name__}: {exc})") from exc
    gm = fx.GraphModule(module, graph)
    modules = dict(module.named_modules())
    state = module.state_dict()
    uf = _UnionFind()
    sites: dict[str, _Site] = {}
    param_axes: dict[str, list[int | None]] = {key: [None] * t.ndim for key, t in state.items()}
    group_owner: dict[int, str] = {}
    producers: list[tuple[fx.Node, int, str]] = []  # (node, group, module path) of Linear/Conv outputs

    def assign(key: str, axis: int, group: int) -> None:
        current = param_axes[key][axis]
        param_axes[key][axis] = group if current is None else uf.union(current, group)

    def new_group(owner: str) -> int:
        g = uf.new()
        group_owner[g] = owner
        return g

    def site(arg: Any) -> _Site:
        return sites[arg.name] if isinstance(arg, fx.Node) else _Site(_FIXED)

    def permuted(s: _Site) -> bool:
        return uf.find(s.group) != _FIXED

    for node in graph.nodes:
        if node.op == "placeholder":
            sites[node.name] = _Site(_FIXED)
        elif node.op == "get_attr":
            raise _unsupported(func, f"the tensor '{node.target}' is used directly in forward()")
        elif node.op == "output":
            for arg in _node_args(node):
                uf.union(sites[arg.name].group, _FIXED)
        elif node.op == "call_module":
            sites[node.name] = _module_rule(
                node,
                modules[node.target],
                site(node.args[0]) if node.args else _Site(_FIXED),
                assign,
                new_group,
                permuted,
                producers,
                func,
            )
        else:
            sites[node.name] = _function_rule(node, [site(a) for a in _node_args(node)], uf, permuted, func)

    roots: dict[int, str] = {}
    for g in sorted(group_owner):
        root = uf.find(g)
        if root != _FIXED and root not in roots:
            roots[root] = _unique_name(f"P_{group_owner[g]}", roots.values())
    axes = {
        key: tuple(None if g is None or uf.find(g) == _FIXED else roots[uf.find(g)] for g in groups)
        for key, groups in param_axes.items()
    }
    node_sites = {name: (roots[uf.find(s.group)], s.kind) for name, s in sites.items() if uf.find(s.group) != _FIXED}
    repair_sites = []
    for node, group, path in producers:
        if uf.find(group) == _FIXED:
            continue
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(modules[str(users[0].target)], _BN_MODULES):
            path = str(users[0].target)
        repair_sites.append((path, sites[node.name].kind))
    return _Graph(PermutationSpec(axes), node_sites, repair_sites, gm)


def _unique_name(name: str, taken: Iterable[str]) -> str:
    taken = set(taken)
    out, i = name, 2
    while out in taken:
        out, i = f"{name}_{i}", i + 1
    return out


def _node_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []

    def collect(n: fx.Node) -> fx.Node:
        found.append(n)
        return n

    fx.node.map_arg((node.args, node.kwargs), collect)
    return found


def _module_rule(
    node: fx.Node,
    m: nn.Module,
    inp: _Site,
    assign: Callable[[str, int, int], None],
    new_group: Callable[[str], int],
    permuted: Callable[[_Site], bool],
    producers: list[tuple[fx.Node, int, str]],
    func: str,
) -> _Site:
    """Permutation group of a module's output, recording which parameter axes it touches."""
    path = str(node.target)
    prefix = f"{path}." if path else ""
    kind_name = f"'{path}' ({type(m).__name__})"
    if isinstance(m, nn.Linear):
        if permuted(inp) and inp.kind != "features":
            raise _unsupported(func, f"{kind_name} is applied to a channel-first feature map")
        out = new_group(path)
        assign(prefix + "weight", 0, out)
        assign(prefix + "weight", 1, inp.group)
        if m.bias is not None:
            assign(prefix + "bias", 0, out)
        producers.append((node, out, path))
        return _Site(out, "features")
    if isinstance(m, _CONV_MODULES):
        if permuted(inp) and inp.kind == "features":
            raise _unsupported(func, f"{kind_name} is applied to features laid out along the last axis")
        if m.groups == 1:
            out = new_group(path)
            assign(prefix + "weight", 1, inp.group)
        elif m.groups == m.in_channels == m.out_channels:  # depthwise: one filter per channel
            out = inp.group
        else:
            raise _unsupported(func, f"{kind_name} is a grouped convolution")
        assign(prefix + "weight", 0, out)
        if m.bias is not None:
            assign(prefix + "bias", 0, out)
        producers.append((node, out, path))
        return _Site(out, "channels")
    if isinstance(m, _CHANNEL_NORM_MODULES):
        for key in ("weight", "bias", "running_mean", "running_var"):
            if getattr(m, key, None) is not None:
                assign(prefix + key, 0, inp.group)
        return _Site(inp.group, inp.kind)
    if isinstance(m, nn.LayerNorm):
        if permuted(inp) and (len(m.normalized_shape) != 1 or inp.kind != "features"):
            raise _unsupported(func, f"{kind_name} normalises over more than the permuted feature axis")
        for key in ("weight", "bias"):
            if getattr(m, key, None) is not None:
                assign(prefix + key, 0, inp.group)
        return _Site(inp.group, inp.kind)
    if isinstance(m, nn.GroupNorm):
        if permuted(inp) and m.num_groups not in (1, m.num_channels):
            raise _unsupported(func, f"{kind_name} normalises groups of channels, which a permutation would mix")
        for key in ("weight", "bias"):
            if getattr(m, key, None) is not None:
                assign(prefix + key, 0, inp.group)
        return _Site(inp.group, inp.kind)
    if isinstance(m, nn.PReLU):
        if m.num_parameters > 1:
            assign(prefix + "weight", 0, inp.group)
        return _Site(inp.group, inp.kind)
    if isinstance(m, nn.Embedding):
        if permuted(inp):
            raise _unsupported(func, f"{kind_name} receives permuted inputs")
        out = new_group(path)
        assign(prefix + "weight", 1, out)
        return _Site(out, "features")
    if isinstance(m, _ELEMENTWISE_MODULES):
        return _Site(inp.group, inp.kind)
    if isinstance(m, _POOL_MODULES):
        if permuted(inp) and inp.kind == "features":
            raise _unsupported(func, f"{kind_name} pools features laid out along the last axis")
        size = getattr(m, "output_size", None)
        sizes = size if isinstance(size, tuple) else (size,)
        pooled = size is not None and all(s == 1 for s in sizes)
        return _Site(inp.group, "pooled" if pooled or inp.kind == "pooled" else "channels")
    if isinstance(m, nn.Flatten):
        if permuted(inp):
            if (m.start_dim, m.end_dim) != (1, -1):
                raise _unsupported(func, f"{kind_name} flattens other dimensions than all after the batch")
            if inp.kind == "channels":
                raise _unsupported(
                    func,
                    f"{kind_name} flattens a feature map whose spatial size may exceed 1, mixing channels and positions",
                )
        return _Site(inp.group, "features")
    if isinstance(m, nn.Unflatten):
        if permuted(inp):
            raise _unsupported(func, f"{kind_name} reshapes permuted features")
        return _Site(_FIXED, "channels")
    if any(True for _ in m.parameters()) or permuted(inp):
        raise _unsupported(func, f"unsupported module {kind_name}")
    return _Site(_FIXED)


def _function_rule(
    node: fx.Node, args: list[_Site], uf: _UnionFind, permuted: Callable[[_Site], bool], func: str
) -> _Site:
    """Permutation group of the output of a function or method call."""
    target = node.target
    live = [s for s in args if permuted(s)]
    if not live:
        return _Site(_FIXED, args[0].kind if args else "features")
    if (
        node.op == "call_function"
        and target in _ELEMENTWISE_FUNCTIONS
        or node.op == "call_method"
        and target in _ELEMENTWISE_METHODS
    ):
        if len(args) == 1:
            return _Site(args[0].group, args[0].kind)
    if (
        node.op == "call_function"
        and target in _BINARY_FUNCTIONS
        or node.op == "call_method"
        and target in _BINARY_METHODS
    ):
        if len(args) == 1:
            return _Site(args[0].group, args[0].kind)
        if len(args) == 2:
            group = uf.union(args[0].group, args[1].group)
            return _Site(group, live[0].kind)
    is_flatten = (node.op == "call_function" and target is torch.flatten) or (
        node.op == "call_method" and target == "flatten"
    )
    if is_flatten and len(args) == 1 and live[0].kind in ("features", "pooled"):
        start = (
            node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0 if node.op == "call_function" else 0)
        )
        if start == 1:
            return _Site(live[0].group, "features")
    name = getattr(target, "__name__", str(target))
    raise _unsupported(
        func,
        f"the operation '{name}' (graph node '{node.name}') acts on permuted features in a way the tracer does not model",
    )


def permutation_spec(model: Any) -> PermutationSpec:
    """Which weight axes share a permutation of hidden units, derived by tracing the model (torch.fx).

    Every Linear/Conv output starts a permutation; it acts on the layer's output axis (weight rows,
    bias) and on the input axis of every layer that reads it. BatchNorm (weights and running
    statistics), LayerNorm, elementwise activations, pooling and flattening a pooled map carry it
    through; a residual addition joins the permutations of its operands into one shared across the
    residual stream. Network inputs and outputs are never permuted.

    ``model``: a loaded model or ``nn.Module``. Raises :class:`ArchitectureError` naming the module or
    operation it cannot model (e.g. attention); pass a hand-written :class:`PermutationSpec` as
    ``spec=`` to the other functions for such models.
    """
    return _trace(_module(model, "model", "permutation_spec"), "permutation_spec").spec


# ---------------------------------------------------------------------------------------------
# Applying permutations


def _permute_state(
    state: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    perms: Mapping[str, torch.Tensor],
    skip: tuple[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """``state`` with each permuted axis reordered (``take`` semantics); ``skip`` leaves one axis alone."""
    out = dict(state)
    for key, axes in spec.axes.items():
        t = state[key]
        for axis, name in enumerate(axes):
            if name is None or name not in perms or (key, axis) == skip:
                continue
            t = t.index_select(axis, perms[name].to(t.device))
        out[key] = t
    return out


def apply_permutation(model: Any, permutations: Any, *, spec: PermutationSpec | None = None) -> nn.Module:
    """A copy of ``model`` with its hidden units reordered; it computes the same function.

    ``permutations``: ``{permutation name: index array}`` or a :class:`WeightMatchingResult` /
    :class:`ActivationMatchingResult`; unit ``i`` of the copy is unit ``permutations[p][i]`` of the
    model. Permutations not given stay the identity. BatchNorm running statistics are permuted with
    their channels. ``spec``: a hand-written :class:`PermutationSpec` (default: traced). The input
    model is not modified.
    """
    func = "apply_permutation"
    module = _module(model, "model", func)
    state = module.state_dict()
    spec = _trace(module, func).spec if spec is None else spec
    sizes = _check_spec(spec, state, func)
    perms = _check_permutations(permutations, sizes, func)
    out = private_copy(module)
    out.load_state_dict(_permute_state(state, spec, perms))
    return out


# ---------------------------------------------------------------------------------------------
# Weight matching


def _float_state(module: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    return {
        k: (v.detach().to(device=device, dtype=torch.float64) if v.is_floating_point() else v.detach().to(device))
        for k, v in module.state_dict().items()
    }


def _weight_matching_core(
    sa: Mapping[str, torch.Tensor],
    sb: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    sizes: Mapping[str, int],
    weight_keys: set[str],
    max_iter: int,
    rng: np.random.Generator,
    progress: Progress = None,
    init: Mapping[str, torch.Tensor] | None = None,
    track: bool = True,
) -> tuple[dict[str, torch.Tensor], list[float], int, bool]:
    """Coordinate descent: each step solves one linear assignment with the other permutations fixed.

    The assignment is solved on a float32 cost matrix (the costly ``n × n`` products). When a
    permutation acts on both axes of a weight (a residual stream read and written by one layer) the
    objective is quadratic in it and the assignment maximises only its linearisation, which can
    overshoot; so every candidate is kept only when the exact float64 objective, with the candidate
    on every axis it acts on, rises by a positive amount. The descent is therefore monotone, ends
    at the best permutations it visited and stops. Starts from ``init`` (default: identity).
    ``track``: record the objective after each pass (costs one pass over the weights)."""
    device = next(iter(sa.values())).device
    touching = {p: [(k, ax) for k, ax in pairs if k in weight_keys] for p, pairs in spec.perms.items()}
    names = [p for p in spec.perm_names if touching[p]]
    touched_keys = {p: list(dict.fromkeys(k for k, _ in touching[p])) for p in names}
    # a permutation on both axes of one weight makes the objective quadratic in it; for the others the
    # assignment's cost matrix gives the exact gain of a step
    quadratic = {p for p in names if len(touched_keys[p]) < len(touching[p])}
    perms = {p: torch.arange(sizes[p], device=device) for p in spec.perm_names}
    if init is not None:
        perms.update({p: t.to(device) for p, t in init.items()})
    a_rows32 = {
        (k, ax): sa[k].movedim(ax, 0).reshape(sa[k].shape[ax], -1).float().contiguous()
        for p in names
        for k, ax in touching[p]
    }
    sb32 = {k: sb[k].float() for k in weight_keys}

    def b_rows(state: Mapping[str, torch.Tensor], p: str, k: str, ax: int) -> torch.Tensor:
        """Weight ``k`` of B with every permutation but ``p``'s applied, ``p``'s axis first, flattened."""
        wb = _permute_state({k: state[k]}, PermutationSpec({k: spec.axes[k]}), perms, skip=(k, ax))[k]
        return wb.movedim(ax, 0).reshape(sizes[p], -1)

    def objective() -> float:
        pb = _permute_state(sb, spec, perms)
        return float(sum((sa[k] * pb[k]).sum() for k in weight_keys))

    def exact_gain(p: str, candidate: torch.Tensor) -> float:
        """Change of the float64 objective when ``p`` becomes ``candidate`` on every axis it acts on."""
        moved = {**perms, p: candidate}
        gain = 0.0
        for k in touched_keys[p]:
            one = PermutationSpec({k: spec.axes[k]})
            new = _permute_state({k: sb[k]}, one, moved)[k]
            old = _permute_state({k: sb[k]}, one, perms)[k]
            gain += float((sa[k] * (new - old)).sum())
        return gain

    history = [objective()] if track else []
    converged = False
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 - n_iter is reported
        improved = False
        for p in rng.permutation(names):
            (k0, ax0), *rest = touching[p]
            cost = a_rows32[(k0, ax0)] @ b_rows(sb32, p, k0, ax0).T
            for k, ax in rest:
                cost += a_rows32[(k, ax)] @ b_rows(sb32, p, k, ax).T
            cost_np = cost.cpu().numpy()
            _, col = linear_sum_assignment(cost_np, maximize=True)
            new_perm = torch.as_tensor(col, device=device)
            if torch.equal(new_perm, perms[p]):
                continue
            # kept only when the objective rises: on the float32 costs when their gain is far above their
            # rounding (a permutation the objective is linear in), else by the exact float64 gain
            rows = np.arange(len(col))
            scale = float(np.abs(cost_np[rows, col]).sum())
            gain32 = float(cost_np[rows, col].sum(dtype=np.float64) - cost_np[rows, perms[p].cpu().numpy()].sum(dtype=np.float64))
            if (p not in quadratic and gain32 > 1e-4 * scale) or exact_gain(p, new_perm) > 1e-12 * max(1.0, scale):
                perms[p] = new_perm
                improved = True
        if track:
            history.append(objective())
        if progress is not None:
            progress(n_iter if improved else max_iter, max_iter)  # a pass that changes nothing ends the work
        if not improved:
            converged = True
            break
    if not converged:
        logger.info("weight matching stopped after max_iter=%d passes before converging", max_iter)
    return perms, history, n_iter, converged


def weight_matching(
    model_a: Any,
    model_b: Any,
    *,
    spec: PermutationSpec | None = None,
    max_iter: int = 100,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress = None,
) -> WeightMatchingResult:
    """Permute model B's hidden units to maximise ``Σ ⟨θ_A, π(θ_B)⟩`` (Git Re-Basin weight matching).

    Coordinate descent over the permutations in a random order (seeded): each step fixes the others
    and solves a linear assignment on the summed inner products of all weights that the permutation
    touches; stops when a full pass improves nothing (a local optimum) or after ``max_iter`` passes.
    Uses the weights only (no data); BatchNorm running statistics are not matched but are permuted by
    :func:`apply_permutation`. The assignment costs are float32 products; a step is kept only when
    the exact float64 objective, with the new permutation on every axis it acts on (both axes of a
    weight that reads and writes one residual stream), rises, so the objective never decreases and the
    result is the best permutation visited.

    ``model_a``, ``model_b``: loaded models or ``nn.Module`` of the same architecture; B is the one
    permuted. ``spec``: a :class:`PermutationSpec` (default: :func:`permutation_spec` of A).
    ``max_iter``: passes at most (1-10000; usually converges in under 10). ``seed``: order of the
    permutations in each pass. ``progress``: callable ``(pass, max_iter)``, called after each pass; a pass that
    changes nothing (convergence) reports ``(max_iter, max_iter)``.
    """
    func = "weight_matching"
    start = time.perf_counter()
    a, b = _module(model_a, "model_a", func), _module(model_b, "model_b", func)
    max_iter = check_int(max_iter, "max_iter", func=func, low=1, high=10000)
    seed = check_seed(seed, func=func)
    check_progress(progress, func=func)
    _check_same_architecture(a, b, func)
    _check_finite_weights(a, "model_a", func)
    _check_finite_weights(b, "model_b", func)
    spec = _trace(a, func).spec if spec is None else spec
    sizes = _check_spec(spec, a.state_dict(), func)
    dev = float64_device(resolve_device(device))
    sa, sb = _float_state(a, dev), _float_state(b, dev)
    weight_keys = {k for k, _ in a.named_parameters()} & set(spec.axes)
    perms, history, n_iter, converged = _weight_matching_core(
        sa, sb, spec, sizes, weight_keys, max_iter, np.random.default_rng(seed), progress
    )
    return WeightMatchingResult(
        permutations={p: perms[p].cpu().numpy() for p in spec.perm_names},
        perm_sizes=dict(sizes),
        objective=np.asarray(history),
        n_iterations=n_iter,
        converged=converged,
        estimator="weight matching (Ainsworth et al. 2023): coordinate descent, linear assignment per permutation",
        n_samples=0,
        params={"max_iter": max_iter},
        seed=seed,
        device=str(dev),
        dtype="float64",
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------------------
# Running models on data


def _working_copy(
    module: nn.Module, device: torch.device, state: Mapping[str, torch.Tensor] | None = None
) -> nn.Module:
    """A copy in eval mode on ``device`` in the module's own precision, optionally loaded with ``state`` (cast)."""
    work = private_copy(module).to(device=device).eval()
    if state is not None:
        work.load_state_dict(state)
    return work


def _module_dtype(module: nn.Module) -> torch.dtype:
    return next((t.dtype for t in module.state_dict().values() if t.is_floating_point()), torch.float32)


def _batches(x: torch.Tensor, batch_size: int, device: torch.device, dtype: torch.dtype) -> Iterable[torch.Tensor]:
    """Batches of ``x`` on ``device``; floating inputs cast to the model's ``dtype``."""
    for i in range(0, x.shape[0], batch_size):
        yield rows_on(x, i, i + batch_size, device, dtype)


def _evaluate(
    module: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device, func: str
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``module`` on ``(x, y)``."""
    total_loss, correct = 0.0, 0
    y_dev = y.to(device)
    with torch.inference_mode():
        for i, xb in enumerate(_batches(x, batch_size, device, _module_dtype(module))):
            logits = module(xb).double()
            yb = y_dev[i * batch_size : (i + 1) * batch_size]
            if logits.ndim != 2 or logits.shape[0] != yb.shape[0] or logits.shape[1] <= int(y.max()):
                raise DataError(
                    f"{func}: the model outputs shape {tuple(logits.shape)} but the labels need (batch, > {int(y.max())}) "
                    "class scores; pick a classifier whose outputs match the dataset's classes."
                )
            total_loss += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
    return total_loss / x.shape[0], correct / x.shape[0]


def _has_bn(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _reset_bn(
    module: nn.Module,
    x: torch.Tensor,
    batch_size: int,
    device: torch.device,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Recompute BatchNorm running statistics as the average over ``x`` (other modules stay in eval mode).

    ``on_batch(i)`` is called after batch ``i`` (from 1)."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with torch.no_grad():
            for i, xb in enumerate(_batches(x, batch_size, device, _module_dtype(module)), start=1):
                module(xb)
                if on_batch is not None:
                    on_batch(i)
    finally:
        for m, momentum in zip(bns, saved):
            m.momentum = momentum
            m.eval()


def _channel_view(out: torch.Tensor, kind: str) -> torch.Tensor:
    """``(n_observations, n_channels)``: channels last, every other axis an observation."""
    t = out.movedim(1, -1) if kind != "features" else out
    return t.reshape(-1, t.shape[-1])


def _channel_shape(out: torch.Tensor, kind: str) -> tuple[int, ...]:
    shape = [1] * out.ndim
    axis = 1 if kind != "features" else out.ndim - 1
    shape[axis] = out.shape[axis]
    return tuple(shape)


class _StopForward(Exception):
    """Raised by a hook once the statistics it needs are recorded."""


def _site_stats(
    module: nn.Module,
    x: torch.Tensor,
    sites: Sequence[tuple[str, str]],
    batch_size: int,
    device: torch.device,
    corrections: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    stop_after_last: bool = False,
    correction_kinds: Mapping[str, str] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and std at each site over ``x``, with ``corrections`` (site -> scale, shift) applied.

    ``correction_kinds``: the layout of each corrected site's output (``features`` or channels)."""
    modules = dict(module.named_modules())
    sums: dict[str, list[Any]] = {path: [0, 0.0, 0.0] for path, _ in sites}
    kinds = {**(correction_kinds or {}), **dict(sites)}
    handles = []
    last = sites[-1][0]

    def make_hook(path: str) -> Callable[..., Any]:
        def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> Any:
            if corrections is not None and path in corrections:
                scale, shift = corrections[path]
                shape = _channel_shape(out, kinds[path])
                out = out * scale.to(out.dtype).reshape(shape) + shift.to(out.dtype).reshape(shape)
            if path in sums:
                v = _channel_view(out, kinds[path]).double()
                acc = sums[path]
                acc[0] += v.shape[0]
                acc[1] = acc[1] + v.sum(0)
                acc[2] = acc[2] + (v * v).sum(0)
                if stop_after_last and path == last:
                    raise _StopForward
            return out

        return hook

    hooked = set(kinds) | set(corrections or {})
    try:
        for path in hooked:
            handles.append(modules[path].register_forward_hook(make_hook(path)))
        with torch.no_grad():
            for xb in _batches(x, batch_size, device, _module_dtype(module)):
                try:
                    module(xb)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    out = []
    for path, _ in sites:
        n, s1, s2 = sums[path]
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0.0)
        out.append((mean, var.sqrt()))
    return out


def _correction_hooks(
    module: nn.Module, kinds: Mapping[str, str], corrections: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
) -> list[Any]:
    modules = dict(module.named_modules())
    handles = []
    for path, (scale, shift) in corrections.items():

        def hook(
            _m: nn.Module,
            _inp: Any,
            out: torch.Tensor,
            scale: torch.Tensor = scale,
            shift: torch.Tensor = shift,
            kind: str = kinds[path],
        ) -> torch.Tensor:
            shape = _channel_shape(out, kind)
            return out * scale.to(out.dtype).reshape(shape) + shift.to(out.dtype).reshape(shape)

        handles.append(modules[path].register_forward_hook(hook))
    return handles


def _repair_corrections(
    work: nn.Module,
    x: torch.Tensor,
    sites: Sequence[tuple[str, str]],
    goals: Sequence[tuple[torch.Tensor, torch.Tensor]],
    batch_size: int,
    device: torch.device,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """REPAIR: per site in order, rescale channels so their mean and std match the goal statistics."""
    corrections: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for k, (path, kind) in enumerate(sites):
        ((mean, std),) = _site_stats(
            work, x, [(path, kind)], batch_size, device, corrections, stop_after_last=True, correction_kinds=dict(sites)
        )
        goal_mean, goal_std = goals[k]
        scale = goal_std / (std + _REPAIR_EPS)
        corrections[path] = (scale, goal_mean - mean * scale)
    return corrections


# ---------------------------------------------------------------------------------------------
# Interpolation and barriers


def interpolate(
    model_a: Any,
    model_b: Any,
    dataset: Any,
    *,
    train_dataset: Any = None,
    n_points: int = 25,
    repair: str | None = None,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    progress: Progress = None,
) -> InterpolationResult:
    """Loss and accuracy of the networks ``(1 − λ) θ_A + λ θ_B`` on ``n_points`` evenly spaced λ in [0, 1].

    Evaluated on ``dataset`` (the ``"test"`` curves) and, when given, ``train_dataset``
    (``"train"``); ``params["datasets"]`` names the dataset of each split (the ``"test"`` curves are those
    of whatever dataset was given, the digits train split included). Weights are interpolated in float64, the network runs in its own precision
    (float32 for the bundled models) and losses and statistics are summed in float64. To look for a low-loss path after alignment, permute B first
    (``apply_permutation(model_b, weight_matching(model_a, model_b))``).

    ``repair``: ``None`` interpolates all parameters and buffers; ``"reset_bn"`` recomputes BatchNorm
    running statistics at each λ; ``"repair"`` additionally applies REPAIR (Jordan et al. 2022): each
    hidden pre-activation channel of the interpolated network is rescaled so its mean and std equal
    the interpolation of the endpoints' (fixes the variance collapse of averaged networks).
    Statistics come from ``train_dataset`` when given, else ``dataset``.
    ``n_points``: 3-201 (25 resolves typical barriers). ``batch_size``: samples per forward pass.
    ``progress``: callable ``(points done, n_points)``.
    """
    func = "interpolate"
    start = time.perf_counter()
    a, b = _module(model_a, "model_a", func), _module(model_b, "model_b", func)
    n_points = check_int(n_points, "n_points", func=func, low=3, high=201)
    batch_size = check_int(batch_size, "batch_size", func=func, low=1)
    repair_mode = "none" if repair is None else check_choice(repair, "repair", REPAIR_MODES, func=func)
    check_progress(progress, func=func)
    _check_same_architecture(a, b, func)
    _check_finite_weights(a, "model_a", func)
    _check_finite_weights(b, "model_b", func)
    splits = {"test": _check_dataset(dataset, "dataset", func)}
    _check_runs(a, dataset, "dataset", func)
    if train_dataset is not None:
        splits["train"] = _check_dataset(train_dataset, "train_dataset", func)
        _check_runs(a, train_dataset, "train_dataset", func)
    stats_x = splits["train" if "train" in splits else "test"][0]
    dev = float64_device(resolve_device(device))
    sites = _trace(a, func).repair_sites if repair_mode == "repair" else []
    with full_float32():
        lambdas, loss, acc = _interpolate_core(
            a, b, splits, stats_x, n_points, repair_mode, sites, batch_size, dev, func, progress
        )
    return InterpolationResult(
        lambdas=lambdas,
        loss=loss,
        accuracy=acc,
        repair=repair_mode,
        estimator=f"linear interpolation (1−λ)θ_A + λθ_B, mean cross-entropy{_REPAIR_LABELS[repair_mode]}",
        n_samples=int(splits["test"][0].shape[0]),
        params={
            "n_points": n_points,
            "repair": repair_mode,
            "batch_size": batch_size,
            "n_train": int(splits["train"][0].shape[0]) if "train" in splits else 0,
            "datasets": {"test": str(getattr(dataset, "name", "")),
                         **({"train": str(getattr(train_dataset, "name", ""))} if train_dataset is not None else {})},
        },
        seed=0,
        device=str(dev),
        dtype=str(_module_dtype(a)).replace("torch.", ""),
        seconds=time.perf_counter() - start,
    )


_REPAIR_LABELS = {"none": "", "reset_bn": ", BatchNorm statistics reset", "repair": ", REPAIR (Jordan et al. 2022)"}


def _interpolate_core(
    a: nn.Module,
    b: nn.Module,
    splits: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    stats_x: torch.Tensor,
    n_points: int,
    repair: str,
    sites: Sequence[tuple[str, str]],
    batch_size: int,
    device: torch.device,
    func: str,
    progress: Progress,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    sa, sb = _float_state(a, device), _float_state(b, device)
    work = _working_copy(a, device, sa)
    kinds = dict(sites)
    goals: list[tuple[torch.Tensor, torch.Tensor]] = []
    if repair == "repair" and sites:
        stats_a = _site_stats(work, stats_x, sites, batch_size, device)
        work.load_state_dict(sb)
        stats_b = _site_stats(work, stats_x, sites, batch_size, device)
    lambdas = np.linspace(0.0, 1.0, n_points)
    loss = {s: np.zeros(n_points) for s in splits}
    acc = {s: np.zeros(n_points) for s in splits}
    for i, lam in enumerate(lambdas):
        work.load_state_dict(_lerp(sa, sb, float(lam)))
        if repair != "none":
            _reset_bn(work, stats_x, batch_size, device)
        handles: list[Any] = []
        if repair == "repair" and sites:
            goals = [
                ((1 - lam) * ma + lam * mb, (1 - lam) * da + lam * db) for (ma, da), (mb, db) in zip(stats_a, stats_b)
            ]
            handles = _correction_hooks(
                work, kinds, _repair_corrections(work, stats_x, sites, goals, batch_size, device)
            )
        try:
            for split, (x, y) in splits.items():
                loss[split][i], acc[split][i] = _evaluate(work, x, y, batch_size, device, func)
        finally:
            for h in handles:
                h.remove()
        if progress is not None:
            progress(i + 1, n_points)
    return lambdas, loss, acc


def _lerp(sa: Mapping[str, torch.Tensor], sb: Mapping[str, torch.Tensor], lam: float) -> dict[str, torch.Tensor]:
    return {k: torch.lerp(v, sb[k], lam) if v.is_floating_point() else v for k, v in sa.items()}


def loss_barrier(curve: InterpolationResult) -> BarrierResult:
    """The loss barrier of an interpolation curve under both common definitions, for every split.

    ``linear``: ``max_λ L(λ) − ((1−λ) L_A + λ L_B)`` (Entezari et al. 2022);
    ``mean``: ``max_λ L(λ) − ½(L_A + L_B)`` (Frankle et al. 2020, as error; Ainsworth et al. 2023). λ = 0 and
    1 are on the curve, so ``linear`` ≥ 0 (0 when the curve never rises above the chord, also for a curve
    below it) and ``mean`` ≥ ½|L_A − L_B| (reached at the worse endpoint when nothing in between is
    higher); both are 0 for a flat curve. ``accuracy_drop`` is the analogue for accuracy (≥ 0 likewise).
    """
    func = "loss_barrier"
    if not isinstance(curve, InterpolationResult):
        raise ParameterError(
            f"The 'curve' parameter of {func} must be an InterpolationResult (from interpolate). Got {type(curve).__name__}."
        )
    start = time.perf_counter()
    lam = curve.lambdas
    linear, mean, drop, at_linear, at_mean = {}, {}, {}, {}, {}
    def chord(v: np.ndarray) -> np.ndarray:  # the straight line between the endpoints, exactly flat when they are equal
        return np.full_like(v, v[0]) if v[0] == v[-1] else (1 - lam) * v[0] + lam * v[-1]

    for split, values in curve.loss.items():
        line = chord(values)
        excess = values - line
        above_mean = values - 0.5 * (values[0] + values[-1])
        linear[split], at_linear[split] = float(excess.max()), float(lam[int(excess.argmax())])
        mean[split], at_mean[split] = float(above_mean.max()), float(lam[int(above_mean.argmax())])
        accuracy = curve.accuracy[split]
        drop[split] = float((chord(accuracy) - accuracy).max())
    return BarrierResult(
        linear=linear,
        mean=mean,
        accuracy_drop=drop,
        lambda_linear=at_linear,
        lambda_mean=at_mean,
        definitions=dict(BARRIER_DEFINITIONS),
        estimator=f"loss barrier of {curve.estimator}",
        n_samples=curve.n_samples,
        params=dict(curve.params),
        seed=curve.seed,
        device=curve.device,
        dtype=curve.dtype,
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------------------
# Activation matching


def activation_matching(
    model_a: Any,
    model_b: Any,
    dataset: Any,
    *,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    progress: Progress = None,
) -> ActivationMatchingResult:
    """Permute model B's hidden units to maximise the correlation of their activations with A's.

    Runs both models on ``dataset`` and, for each permutation found by :func:`permutation_spec`,
    sums the Pearson correlation matrices ``corr(a_i, b_j)`` of every activation that carries it
    (pre- and post-activation, BatchNorm outputs; conv channels count each position as an
    observation), then solves one linear assignment. The data-based alternative of Ainsworth et al.;
    labels are not used.

    ``dataset``: inputs both models accept (a few hundred samples suffice). ``batch_size``: samples per
    forward pass. ``progress``: callable ``(batches done, n_batches)``.
    """
    func = "activation_matching"
    start = time.perf_counter()
    a, b = _module(model_a, "model_a", func), _module(model_b, "model_b", func)
    batch_size = check_int(batch_size, "batch_size", func=func, low=1)
    check_progress(progress, func=func)
    _check_same_architecture(a, b, func)
    _check_finite_weights(a, "model_a", func)
    _check_finite_weights(b, "model_b", func)
    x = getattr(dataset, "x", None)
    if not isinstance(x, torch.Tensor):
        raise ParameterError(
            f"{func}: 'dataset' must be a Dataset (workbench.data.load_dataset). Got {type(dataset).__name__}."
        )
    if x.shape[0] < 2:
        raise DataError(
            f"{func}: dataset '{getattr(dataset, 'name', '?')}' has {x.shape[0]} sample(s); at least 2 are needed to "
            "correlate activations."
        )
    _check_runs(a, dataset, "dataset", func)
    dev = float64_device(resolve_device(device))
    graph = _trace(a, func)
    sizes = _check_spec(graph.spec, a.state_dict(), func)
    perms, before, after = _activation_matching_core(a, b, graph, sizes, x, batch_size, dev, progress)
    return ActivationMatchingResult(
        permutations={p: perms[p] for p in graph.spec.perm_names},
        perm_sizes=dict(sizes),
        correlation_before=before,
        correlation_after=after,
        estimator="activation matching: Pearson correlation of activations, linear assignment per permutation",
        n_samples=int(x.shape[0]),
        params={"batch_size": batch_size},
        seed=0,
        device=str(dev),
        dtype="float64",
        seconds=time.perf_counter() - start,
    )


def _record_nodes(
    gm: fx.GraphModule, xb: torch.Tensor, wanted: Mapping[str, tuple[str, str]]
) -> dict[str, torch.Tensor]:
    """Run the traced graph on ``xb`` and return the ``(observations, channels)`` view of each wanted node."""
    recorded: dict[str, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n.name in wanted and isinstance(out, torch.Tensor):
                recorded[n.name] = _channel_view(out, wanted[n.name][1]).double()
            return out

    with torch.no_grad():
        Recorder(gm).run(xb)
    return recorded


def _mean_defined(total: np.ndarray, n_defined: np.ndarray) -> float:
    """Mean correlation over the (pair, activation) entries where both units vary; nan where none does."""
    count = float(n_defined.sum())
    return float(total.sum() / count) if count else float("nan")


def _activation_matching_core(
    a: nn.Module,
    b: nn.Module,
    graph: _Graph,
    sizes: Mapping[str, int],
    x: torch.Tensor,
    batch_size: int,
    device: torch.device,
    progress: Progress,
    func: str = "activation_matching",
) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, float]]:
    gm_a = fx.GraphModule(_working_copy(a, device), graph.graph_module.graph)
    gm_b = fx.GraphModule(_working_copy(b, device), graph.graph_module.graph)
    wanted = graph.node_sites
    acc: dict[str, list[Any]] = {name: [0, 0.0, 0.0, 0.0, 0.0, 0.0] for name in wanted}
    n_batches = math.ceil(x.shape[0] / batch_size)
    for i, xb in enumerate(_batches(x, batch_size, device, _module_dtype(a))):
        ra, rb = _record_nodes(gm_a, xb, wanted), _record_nodes(gm_b, xb, wanted)
        for name in wanted:
            va, vb = ra[name], rb[name]
            s = acc[name]
            s[0] += va.shape[0]
            s[1] = s[1] + va.sum(0)
            s[2] = s[2] + vb.sum(0)
            s[3] = s[3] + (va * va).sum(0)
            s[4] = s[4] + (vb * vb).sum(0)
            s[5] = s[5] + va.T @ vb
        if progress is not None:
            progress(i + 1, n_batches)
    corr: dict[str, torch.Tensor] = {}
    defined: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for name, (n, sa_, sb_, saa, sbb, sab) in acc.items():
        perm = wanted[name][0]
        ma, mb = sa_ / n, sb_ / n
        cov = sab / n - ma[:, None] * mb[None, :]
        std_a = (saa / n - ma * ma).clamp_min(0).sqrt()
        std_b = (sbb / n - mb * mb).clamp_min(0).sqrt()
        c = cov / (std_a[:, None] * std_b[None, :] + 1e-12)
        varies = (std_a > 1e-6 * ma.abs())[:, None] & (std_b > 1e-6 * mb.abs())[None, :]  # beyond the rounding of a constant
        corr[perm] = corr[perm] + c if perm in corr else c
        kept = torch.stack([c * varies, varies.to(c.dtype)])  # correlations where both units vary, and their count
        defined[perm] = defined[perm] + kept if perm in defined else kept
        counts[perm] = counts.get(perm, 0) + 1
    perms, before, after = {}, {}, {}
    for p in graph.spec.perm_names:
        if p not in corr:
            perms[p] = np.arange(sizes[p])
            continue
        total, n_defined = defined[p].cpu().numpy()
        if not n_defined.any():
            raise DataError(
                f"{func}: no unit of model A and unit of model B both vary on these samples where permutation '{p}' acts, "
                "so their correlations are undefined and any matching would be arbitrary; use data the models respond to "
                "(such as the data they were trained on), or weight matching."
            )
        c = (corr[p] / counts[p]).cpu().numpy()
        _, col = linear_sum_assignment(c, maximize=True)
        perms[p] = col.astype(np.int64)
        rows = np.arange(len(col))
        before[p] = _mean_defined(np.diag(total), np.diag(n_defined))
        after[p] = _mean_defined(total[rows, col], n_defined[rows, col])
    return perms, before, after


# ---------------------------------------------------------------------------------------------
# Layer analysis (Ito et al.)


def layer_alignment(
    model_a: Any,
    model_b: Any,
    permutations: Any,
    *,
    spec: PermutationSpec | None = None,
    top_k: int = 5,
    device: str | torch.device | None = None,
) -> LayerAlignmentResult:
    """Per-layer distance, singular values and singular-vector alignment before and after permuting B.

    Following Ito et al. (2024): a permutation changes ``‖θ_A − θ_B‖`` but not the singular values of
    any weight matrix (``P W Qᵀ`` has the singular values of ``W``); weight matching lowers the
    distance mainly by aligning the singular vectors with large singular values. For each module
    with a weight matrix (conv kernels read as ``(out, in·k·k)``) this reports the Frobenius distance
    over its parameters, the singular values of A, B and permuted B, and the mean alignment
    ``|⟨u_i^A, u_i^B⟩ · ⟨v_i^A, v_i^B⟩|`` of the top ``top_k`` components (in [0, 1]).

    ``permutations``: a matching result or ``{name: index array}`` applied to B. ``top_k``: number of
    leading singular directions compared (1-1000; clipped to each matrix's rank, ``min(rows, columns)``;
    ``n_components`` records the number used per layer).
    """
    func = "layer_alignment"
    start = time.perf_counter()
    a, b = _module(model_a, "model_a", func), _module(model_b, "model_b", func)
    top_k = check_int(top_k, "top_k", func=func, low=1, high=1000)
    _check_same_architecture(a, b, func)
    _check_finite_weights(a, "model_a", func)
    _check_finite_weights(b, "model_b", func)
    spec = _trace(a, func).spec if spec is None else spec
    sizes = _check_spec(spec, a.state_dict(), func)
    perms = _check_permutations(permutations, sizes, func)
    dev = float64_device(resolve_device(device))
    sa, sb = _float_state(a, dev), _float_state(b, dev)
    pb = _permute_state(sb, spec, perms)
    layers = [
        name
        for name, m in a.named_modules()
        if getattr(m, "weight", None) is not None and isinstance(m.weight, torch.Tensor) and m.weight.ndim >= 2
    ]
    dist_before, dist_after, sv_change, al_before, al_after = [], [], [], [], []
    sv_a, sv_b, comp_before, comp_after, used = {}, {}, {}, {}, {}
    params = dict(a.named_parameters())
    for layer in layers:
        prefix = f"{layer}." if layer else ""
        keys = [k for k in params if k.startswith(prefix) and "." not in k[len(prefix) :]]
        dist_before.append(math.sqrt(sum(float(((sa[k] - sb[k]) ** 2).sum()) for k in keys)))
        dist_after.append(math.sqrt(sum(float(((sa[k] - pb[k]) ** 2).sum()) for k in keys)))
        wk = prefix + "weight"
        shape = tuple(sa[wk].shape)
        ua, sva, vha = torch.linalg.svd(sa[wk].reshape(shape[0], -1), full_matrices=False)
        ub, svb, vhb = torch.linalg.svd(sb[wk].reshape(shape[0], -1), full_matrices=False)
        svp = torch.linalg.svdvals(pb[wk].reshape(shape[0], -1))
        # the singular vectors of P W Qᵀ are P u and Q v: permute B's like its weight
        axes = spec.axes.get(wk, (None,) * len(shape))
        moved = _permute_state(
            {"u": ub, "vh": vhb.reshape(-1, *shape[1:])},
            PermutationSpec({"u": (axes[0], None), "vh": (None, *axes[1:])}),
            perms,
        )
        up, vhp = moved["u"], moved["vh"].reshape(vhb.shape)
        k = used[layer] = min(top_k, sva.shape[0])
        before = ((ua[:, :k] * ub[:, :k]).sum(0) * (vha[:k] * vhb[:k]).sum(1)).abs()
        after = ((ua[:, :k] * up[:, :k]).sum(0) * (vha[:k] * vhp[:k]).sum(1)).abs()
        sv_a[layer], sv_b[layer] = sva.cpu().numpy(), svb.cpu().numpy()
        sv_change.append(float((svb - svp).abs().max()))
        comp_before[layer], comp_after[layer] = before.cpu().numpy(), after.cpu().numpy()
        al_before.append(float(before.mean()))
        al_after.append(float(after.mean()))
    return LayerAlignmentResult(
        layers=tuple(layers),
        distance_before=np.asarray(dist_before),
        distance_after=np.asarray(dist_after),
        singular_values_a=sv_a,
        singular_values_b=sv_b,
        singular_value_change=np.asarray(sv_change),
        alignment_before=np.asarray(al_before),
        alignment_after=np.asarray(al_after),
        component_alignment_before=comp_before,
        component_alignment_after=comp_after,
        top_k=top_k,
        n_components=used,
        estimator=f"Frobenius distance and {_top_k_label(top_k, used)} singular-vector alignment (Ito et al. 2024)",
        n_samples=0,
        params={"top_k": top_k, "n_components": dict(used)},
        seed=0,
        device=str(dev),
        dtype="float64",
        seconds=time.perf_counter() - start,
    )


def _top_k_label(top_k: int, used: Mapping[str, int]) -> str:
    """``top-5``, or ``top-1000 (clipped to each layer's rank, min(rows, columns): 10-64 components)`` when a
    layer has fewer."""
    if all(k == top_k for k in used.values()):
        return f"top-{top_k}"
    low, high = min(used.values()), max(used.values())
    span = f"{low}" if low == high else f"{low}-{high}"
    return f"top-{top_k} (clipped to each layer's rank, min(rows, columns): {span} components)"


# ---------------------------------------------------------------------------------------------
# Everything for one pair


def mode_connectivity(
    model_a: Any,
    model_b: Any,
    dataset: Any,
    *,
    train_dataset: Any = None,
    methods: Sequence[str] | None = None,
    n_points: int = 25,
    max_iter: int = 100,
    top_k: int = 5,
    seed: int = 0,
    spec: PermutationSpec | None = None,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    progress: Progress = None,
) -> ModeConnectivityResult:
    """Interpolation curves, barriers and layer analysis of a pair of models, for several alignments.

    ``methods`` (default: all that apply): ``"naive"`` (B as trained), ``"weight_matching"``,
    ``"activation_matching"`` (matched on ``train_dataset`` when given, else ``dataset``),
    ``"repair"`` (weight matching + REPAIR) and ``"reset_bn"`` (weight matching + BatchNorm reset;
    only for models with BatchNorm). Weight matching is always run, since the layer analysis uses it.
    ``dataset``: where the curves are evaluated (loss and accuracy); ``train_dataset``: the data the
    activation matching, REPAIR and the BatchNorm reset use (default ``dataset``).
    ``spec``: a hand-written :class:`PermutationSpec` for weight matching and the layer analysis
    (activation matching and REPAIR always trace the model).
    ``n_points``: points on each curve, 3-201 (as in :func:`interpolate`). ``max_iter``: passes of
    weight matching at most (1-10000; as in :func:`weight_matching`). ``top_k``: singular directions
    compared per layer (as in :func:`layer_alignment`). ``seed``: order of the permutations in weight
    matching. ``batch_size``: samples per forward pass. ``device``: where the networks run (``None``:
    cuda > mps > cpu).
    ``progress``: callable ``(steps done, total steps)`` over matching and interpolation.
    """
    func = "mode_connectivity"
    start = time.perf_counter()
    a, b = _module(model_a, "model_a", func), _module(model_b, "model_b", func)
    check_progress(progress, func=func)
    if methods is None:
        methods = [m for m in CONNECTIVITY_METHODS if m != "reset_bn" or _has_bn(a)]
    if isinstance(methods, str) or not isinstance(methods, Sequence) or not methods:
        raise ParameterError(
            f"The 'methods' parameter of {func} must be a non-empty list of {format_choices(CONNECTIVITY_METHODS)}. Got {methods!r}."
        )
    methods = [check_choice(m, "methods", CONNECTIVITY_METHODS, func=func) for m in methods]
    n_points = check_int(n_points, "n_points", func=func, low=3, high=201)
    _check_same_architecture(a, b, func)  # named by this function, not by the steps it runs
    _check_finite_weights(a, "model_a", func)
    _check_finite_weights(b, "model_b", func)
    match_data = train_dataset if train_dataset is not None else dataset
    _check_runs(a, dataset, "dataset", func)
    if train_dataset is not None:
        _check_runs(a, train_dataset, "train_dataset", func)
    total = 2 + len(methods) * n_points
    done = 0

    def report(offset: int) -> Callable[[int, int], None]:
        def inner(i: int, _total: int) -> None:
            if progress is not None:
                progress(offset + i, total)

        return inner

    wm = weight_matching(a, b, spec=spec, max_iter=max_iter, seed=seed, device=device)
    report(0)(1, total)
    am = None
    if "activation_matching" in methods:
        am = activation_matching(a, b, match_data, batch_size=batch_size, device=device)
    report(0)(2, total)
    done = 2
    b_wm = apply_permutation(b, wm, spec=spec)
    curves: dict[str, InterpolationResult] = {}
    for method in methods:
        other = b if method == "naive" else apply_permutation(b, am) if method == "activation_matching" else b_wm
        repair = {"repair": "repair", "reset_bn": "reset_bn"}.get(method)
        curves[method] = interpolate(
            a,
            other,
            dataset,
            train_dataset=train_dataset,
            n_points=n_points,
            repair=repair,
            batch_size=batch_size,
            device=device,
            progress=report(done),
        )
        done += n_points
    layers = layer_alignment(a, b, wm, spec=spec, top_k=top_k, device=device)
    test_n = curves[methods[0]].n_samples
    return ModeConnectivityResult(
        curves=curves,
        barriers={m: loss_barrier(c) for m, c in curves.items()},
        layers=layers,
        weight_matching=wm,
        activation_matching=am,
        estimator="linear mode connectivity: interpolation after permutation alignment",
        n_samples=test_n,
        params={
            "methods": list(methods),
            "n_points": n_points,
            "max_iter": max_iter,
            "top_k": top_k,
            "model_a": _model_name(model_a, "model A"),
            "model_b": _model_name(model_b, "model B"),
        },
        seed=seed,
        device=wm.device,
        dtype=curves[methods[0]].dtype,  # the forward passes along the paths; sums and matching are float64
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------------------
# Merging several models


def _average_states(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {
        k: (torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v) for k, v in states[0].items()
    }


def merged_model(
    models: Sequence[Any],
    merge_result: MergeResult | None = None,
    *,
    stats_dataset: Any = None,
    spec: PermutationSpec | None = None,
    batch_size: int = 512,
    progress: Progress = None,
) -> nn.Module:
    """The average of ``models`` after applying the permutations of ``merge_result`` (plain average when ``None``).

    When the models have BatchNorm and ``stats_dataset`` is given, its running statistics are
    recomputed on that data (averaged statistics do not describe an averaged network). Returns a
    float32 module in eval mode on the CPU, like the members.

    ``batch_size``: samples per forward pass of the statistics reset. ``progress``: callable
    ``(steps done, total steps)``: one step for the average, then one per batch of ``stats_dataset``
    when BatchNorm statistics are recomputed; the last call has ``done == total``.
    """
    func = "merged_model"
    batch_size = check_int(batch_size, "batch_size", func=func, low=1)
    check_progress(progress, func=func)
    modules = _check_models(models, func)
    if merge_result is not None and not isinstance(merge_result, MergeResult):
        raise ParameterError(
            f"The 'merge_result' parameter of {func} must be a MergeResult (from merge) or None. Got {type(merge_result).__name__}."
        )
    if merge_result is not None and len(merge_result.permutations) != len(modules):
        raise ParameterError(
            f"{func}: the merge result aligns {len(merge_result.permutations)} models but {len(modules)} were given; pass the same models."
        )
    cpu = torch.device("cpu")
    states = [_float_state(m, cpu) for m in modules]
    if merge_result is not None:
        spec = _trace(modules[0], func).spec if spec is None else spec
        sizes = _check_spec(spec, states[0], func)
        states = [
            _permute_state(s, spec, _check_permutations(p, sizes, func))
            for s, p in zip(states, merge_result.permutations)
        ]
    return _merged_module(modules[0], _average_states(states), stats_dataset, batch_size, func, progress)


def _merged_module(
    template: nn.Module,
    state: Mapping[str, torch.Tensor],
    stats_dataset: Any,
    batch_size: int,
    func: str,
    progress: Progress = None,
) -> nn.Module:
    out = private_copy(template).to(torch.device("cpu")).eval()
    dtype = next((t.dtype for t in template.state_dict().values() if t.is_floating_point()), torch.float32)
    out.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
    x = None
    if stats_dataset is not None and _has_bn(out):
        x = getattr(stats_dataset, "x", None)
        if not isinstance(x, torch.Tensor):
            raise ParameterError(
                f"{func}: 'stats_dataset' must be a Dataset or None. Got {type(stats_dataset).__name__}."
            )
    total = 1 + (math.ceil(x.shape[0] / batch_size) if x is not None else 0)
    if progress is not None:
        progress(1, total)
    if x is not None:

        def on_batch(i: int) -> None:
            if progress is not None:
                progress(1 + i, total)

        work = _working_copy(out, torch.device("cpu"))
        _reset_bn(work, x, batch_size, torch.device("cpu"), on_batch)
        out.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in work.state_dict().items()})
    return out


def _check_models(models: Any, func: str) -> list[nn.Module]:
    if isinstance(models, (nn.Module, str)) or not isinstance(models, Sequence):
        raise ParameterError(
            f"The 'models' parameter of {func} must be a list of loaded models. Got {type(models).__name__}."
        )
    modules = [_module(m, f"models[{i}]", func) for i, m in enumerate(models)]
    if len(modules) < 2:
        raise ParameterError(f"The 'models' parameter of {func} needs at least 2 models. Got {len(modules)}.")
    labels = [f"'{_model_name(m, '')}' (models[{i}])" if _model_name(m, "") else f"models[{i}]" for i, m in enumerate(models)]
    for i, m in enumerate(modules[1:], start=1):
        _check_same_architecture(modules[0], m, func, (labels[0], labels[i]))
    for i, m in enumerate(modules):
        _check_finite_weights(m, f"models[{i}]", func)
    return modules


def merge(
    models: Sequence[Any],
    dataset: Any,
    *,
    method: str = "weight_matching",
    train_dataset: Any = None,
    max_rounds: int = 10,
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    spec: PermutationSpec | None = None,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    progress: Progress = None,
) -> MergeResult:
    """Align three or more models to a common basis, average them, and compare with the members.

    ``method="weight_matching"``: MergeMany (Ainsworth et al. 2023): in random order, each member is
    weight-matched to the average of the other (aligned) members, starting from its current
    permutations. A round visits every member; rounds repeat until one raises the alignment
    objective ``Σ_{i<j} ⟨π_i θ_i, π_j θ_j⟩`` by less than the relative ``tol`` (or changes nothing),
    at most ``max_rounds``. ``"activation_matching"``: every member is matched to the first by
    activation correlation on ``train_dataset`` (or ``dataset``), in one round.

    Reports loss and accuracy on ``dataset`` of each member, of the merged model and of the plain
    (naive) average. For models with BatchNorm the statistics of both averages are recomputed on
    ``train_dataset`` (or ``dataset``). Rebuild the merged network with :func:`merged_model`
    (``stats_dataset=`` the same data).

    ``models``: at least 2 (3 or more for a real merge) models of one architecture. ``max_rounds``:
    1-100. ``tol``: relative improvement per round below which rounds stop (0-1; 1e-3 stops once
    further rounds barely matter). ``seed``: order of members and permutations. ``spec``: a
    hand-written :class:`PermutationSpec` for weight matching (activation matching traces the
    model). ``max_iter``: passes of each weight-matching call at most (1-10000). ``batch_size``: samples
    per forward pass in the evaluations and BatchNorm resets. ``device``: where the networks run
    (``None``: cuda > mps > cpu). ``progress``: callable ``(steps done, total steps)``.
    """
    func = "merge"
    start = time.perf_counter()
    modules = _check_models(models, func)
    method = check_choice(method, "method", MERGE_METHODS, func=func)
    max_rounds = check_int(max_rounds, "max_rounds", func=func, low=1, high=100)
    tol = check_float(tol, "tol", func=func, low=0.0, high=1.0)
    max_iter = check_int(max_iter, "max_iter", func=func, low=1, high=10000)
    seed = check_seed(seed, func=func)
    batch_size = check_int(batch_size, "batch_size", func=func, low=1)
    check_progress(progress, func=func)
    x, y = _check_dataset(dataset, "dataset", func)
    _check_runs(modules[0], dataset, "dataset", func)
    if train_dataset is not None:
        _check_dataset(train_dataset, "train_dataset", func)
        _check_runs(modules[0], train_dataset, "train_dataset", func)
    stats_data = train_dataset if train_dataset is not None else dataset
    dev = float64_device(resolve_device(device))
    graph = None
    if spec is None or method == "activation_matching":
        graph = _trace(modules[0], func)
        spec = graph.spec
    sizes = _check_spec(spec, modules[0].state_dict(), func)
    states = [_float_state(m, dev) for m in modules]
    weight_keys = {k for k, _ in modules[0].named_parameters()} & set(spec.axes)
    n = len(modules)
    perms = [{p: torch.arange(sizes[p], device=dev) for p in spec.perm_names} for _ in modules]
    rng = np.random.default_rng(seed)
    steps = [0, (max_rounds if method == "weight_matching" else 1) * n + n + 2]

    def tick() -> None:
        steps[0] += 1
        if progress is not None:
            progress(steps[0], steps[1])

    def alignment() -> float:
        aligned = [_permute_state(s, spec, p) for s, p in zip(states, perms)]
        return float(
            sum((aligned[i][k] * aligned[j][k]).sum() for i in range(n) for j in range(i + 1, n) for k in weight_keys)
        )

    history = [alignment()]
    if method == "weight_matching":
        for _round in range(max_rounds):
            changed = False
            for i in rng.permutation(n):
                target = _average_states([_permute_state(states[j], spec, perms[j]) for j in range(n) if j != i])
                new, _, _, _ = _weight_matching_core(
                    target, states[i], spec, sizes, weight_keys, max_iter, rng, init=perms[i], track=False
                )
                changed = changed or any(not torch.equal(new[p], perms[i][p]) for p in spec.perm_names)
                perms[i] = new
                tick()
            history.append(alignment())
            if not changed or history[-1] - history[-2] <= tol * abs(history[-2]):
                break
    else:
        traced = graph if graph is not None else _trace(modules[0], func)
        for i in range(1, n):
            found, _, _ = _activation_matching_core(
                modules[0], modules[i], traced, sizes, stats_data.x, batch_size, dev, None, func
            )
            perms[i] = {p: torch.as_tensor(v, device=dev) for p, v in found.items()}
            tick()
        history.append(alignment())
    steps[1] = steps[0] + n + 2
    member_loss, member_acc = [], []
    for m in modules:
        loss, acc = _evaluate(_working_copy(m, dev), x, y, batch_size, dev, func)
        member_loss.append(loss)
        member_acc.append(acc)
        tick()
    has_bn = _has_bn(modules[0])
    averages = []
    for aligned in (True, False):
        st = [_permute_state(s, spec, p) for s, p in zip(states, perms)] if aligned else states
        avg = {k: v.cpu() for k, v in _average_states(st).items()}
        merged = _merged_module(modules[0], avg, stats_data if has_bn else None, batch_size, func)
        averages.append(_evaluate(_working_copy(merged, dev), x, y, batch_size, dev, func))
        tick()
    label = (
        "MergeMany weight matching (Ainsworth et al. 2023)"
        if method == "weight_matching"
        else "activation matching to the first model"
    )
    return MergeResult(
        names=tuple(_model_name(m, f"model {i}") for i, m in enumerate(models)),
        method=method,
        member_loss=np.asarray(member_loss),
        member_accuracy=np.asarray(member_acc),
        merged_loss=averages[0][0],
        merged_accuracy=averages[0][1],
        naive_loss=averages[1][0],
        naive_accuracy=averages[1][1],
        permutations=tuple({p: t.cpu().numpy() for p, t in pm.items()} for pm in perms),
        objective=np.asarray(history),
        n_rounds=len(history) - 1,
        reset_bn=has_bn,
        estimator=f"merge by {label}, averaged weights, cross-entropy",
        n_samples=int(x.shape[0]),
        params={
            "max_rounds": max_rounds,
            "tol": tol,
            "max_iter": max_iter,
            "batch_size": batch_size,
            "n_stats": int(stats_data.x.shape[0]) if has_bn else 0,
        },
        seed=seed,
        device=str(dev),
        dtype=str(_module_dtype(modules[0])).replace("torch.", ""),  # the evaluations; matching sums are float64
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------------------
# Export


def to_safetensors(
    model: Any, *, architecture: Mapping[str, Any] | None = None, name: str | None = None, description: str = ""
) -> bytes:
    """The weights of ``model`` as safetensors bytes, with its architecture spec in the metadata.

    The metadata key ``"architecture"`` holds the spec as JSON (so ``load_model`` rebuilds the
    network without running code), ``"name"`` and ``"description"`` describe it. ``architecture``:
    the spec dict (default: ``model.architecture`` of a loaded model, else the ``torch.nn`` spec of a
    module built from ``nn.Sequential`` and stock layers, such as :func:`merged_model`'s). Raises
    :class:`ArchitectureError` when no spec is known.
    """
    from safetensors.torch import save

    from workbench.models.architectures import describe_module

    func = "to_safetensors"
    module = _module(model, "model", func)
    spec = architecture if architecture is not None else getattr(model, "architecture", None)
    if spec is None:
        try:
            spec = describe_module(module)
        except ArchitectureError:
            spec = None
    if not isinstance(spec, Mapping):
        raise ArchitectureError(
            f"{func}: the model's architecture spec is unknown, so the file could not be loaded again; pass architecture= "
            "(e.g. {'type': 'mlp', 'sizes': [64, 512, 512, 10]})."
        )
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    metadata = {
        "architecture": json.dumps(dict(spec)),
        "name": name or _model_name(model, "model"),
        "description": description,
    }
    return save(tensors, metadata=metadata)


__all__ = [
    "ActivationMatchingResult",
    "BarrierResult",
    "InterpolationResult",
    "LayerAlignmentResult",
    "MergeResult",
    "ModeConnectivityResult",
    "PermutationSpec",
    "WeightMatchingResult",
    "activation_matching",
    "apply_permutation",
    "interpolate",
    "layer_alignment",
    "loss_barrier",
    "merge",
    "merged_model",
    "mode_connectivity",
    "permutation_spec",
    "to_safetensors",
    "weight_matching",
]
