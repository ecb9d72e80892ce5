"""Degeneracy of a network's parameters and the interaction basis.

Bushnaq et al., "Using Degeneracy in the Loss Landscape for Mechanistic Interpretability" (2024), name
three ways in which parameters of a trained network can be *degenerate* (free to change without
changing what the network computes on the data):

1. linear dependence between a layer's activations (directions with zero variance on the data),
2. linear dependence between the gradients passed back into a layer (directions the output does
   not depend on),
3. ReLUs that fire on the same subset of inputs (synchronised firing; dead and always-on units are
   extreme cases).

This module measures each of them and builds the *interaction basis*, a reparameterisation of each
layer that is invariant to the degeneracies of types 1 and 2:

- :func:`activation_rank` -- spectrum, numerical rank and effective rank of the centred activation
  covariance of each layer.
- :func:`gradient_rank` -- spectrum and rank of the Gram matrix of Jacobians of the output (logits, or
  the per-sample loss) with respect to a layer's activations.
- :func:`relu_patterns` -- dead, always-on and synchronised ReLUs.
- :func:`degeneracy_summary` -- free parameters per weight matrix implied by the three sources.
- :func:`interaction_basis` -- the interaction basis (as in the authors' ``rib`` code), its spectra,
  the transformed activations, and the Newman modularity of the graph of interactions between basis
  directions of adjacent layers.
- :func:`llc_estimate` -- the local learning coefficient by SGLD (Lau et al. 2023), a global measure of
  degeneracy that depends on its hyper-parameters (they are recorded and shown with it).
- :func:`sequential_layers`, :func:`default_layers`, :func:`layer_activations` -- the layer names these
  functions accept, a default choice, and flattened activations (``"input"`` included) for
  :func:`activation_rank`.

The network functions (a layer -> the output) are taken from models built as ``torch.nn.Sequential``
(the ``mlp`` and ``cnn`` architectures): "the rest of the network after layer L" is the sub-sequence
of children after L. The pseudo-layer ``"input"`` names the model's input. All work runs in float64
(except the SGLD chains of :func:`llc_estimate`, in the model's own precision) on a private copy of the model; BatchNorm layers use their running statistics (evaluation mode).
Jacobians are computed per sample with ``torch.func.vmap(torch.func.jacrev(...))`` over batches whose
size bounds the memory they take.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import networkx as nx
import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from workbench.activations.capture import private_copy
from workbench.activations.extract import check_inputs
from workbench.activations.types import Activations
from workbench.analyses._result import RecordedResult
from workbench.analyses._validation import as_labels, as_matrix, check_choice, check_float, check_int, check_seed
from workbench.data.datasets import Dataset
from workbench.device import float64_device, resolve_device
from workbench.errors import (
    ArchitectureError,
    DataError,
    ParameterError,
    UnknownLayerError,
    did_you_mean,
    format_choices,
)
from workbench.models.loading import LoadedModel

INPUT_LAYER = "input"
OUTPUTS = ("logits", "loss")
DEFAULT_RTOL = 1e-8
_ACTIVATION_TYPES = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU)
_JACOBIAN_BYTES = 1 << 27  # memory of the per-sample Jacobians held at once (128 MiB)

Progress = Callable[[int, int], None] | None


# ---------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True, kw_only=True)
class RankResult(RecordedResult):
    """Eigen-spectra and ranks of one Gram matrix per layer.

    ``quantity`` says which Gram matrix: ``"activation"`` (centred activation covariance
    ``Xcᵀ Xc / n``, :func:`activation_rank`) or ``"gradient"`` (mean Jacobian Gram ``mean_s J_sᵀ J_s``,
    :func:`gradient_rank`).
    ``eigenvalues[layer]``: ``(width,)`` all eigenvalues, descending, clipped at 0.
    ``rank[layer]``: number of eigenvalues above ``threshold[layer] = rtol * max(eigenvalues)``.
    ``effective_rank[layer]``: ``exp(-sum p_i log p_i)`` with ``p = eigenvalues / sum(eigenvalues)``
    (Roy & Vetterli 2007, applied to the Gram spectrum), in ``[1, width]``; 0 for an all-zero spectrum.
    It is computed from the whole spectrum and does not depend on ``rtol``, so it can exceed ``rank``
    when much of the spectrum lies below the threshold (a large ``rtol``).
    ``width[layer]``: number of features of the layer (the size of the Gram matrix).
    ``output``: what the Jacobians are of (``"logits"`` or ``"loss"``); None for activations.
    """

    quantity: str
    layers: tuple[str, ...]
    eigenvalues: dict[str, np.ndarray]
    rank: dict[str, int]
    effective_rank: dict[str, float]
    width: dict[str, int]
    threshold: dict[str, float]
    rtol: float
    output: str | None
    model: str
    seed: int | None = None
    dtype: str = "float64"


@dataclass(frozen=True, kw_only=True)
class ReluPatternResult(RecordedResult):
    """Firing patterns of ReLU layers over a dataset (a unit *fires* on a sample when its output is > 0).

    Per layer: ``width`` units (elements of the flattened output), ``dead`` (bool mask: never fires),
    ``always_on`` (bool mask: fires on every sample, i.e. acts linearly on this data),
    ``firing_rate`` (fraction of samples each unit fires on), ``group_id`` (int per unit: the
    synchronised group the unit belongs to, numbered 0, 1, ... by decreasing size, or -1) and
    ``group_sizes`` (size of each group). A synchronised group is a set of two or more units, neither
    dead nor always-on, that fire on exactly the same samples. ``n_dead``, ``n_always_on``,
    ``n_synchronised`` (units in some group) and ``n_groups`` count them.
    """

    layers: tuple[str, ...]
    width: dict[str, int]
    dead: dict[str, np.ndarray]
    always_on: dict[str, np.ndarray]
    firing_rate: dict[str, np.ndarray]
    group_id: dict[str, np.ndarray]
    group_sizes: dict[str, np.ndarray]
    n_dead: dict[str, int]
    n_always_on: dict[str, int]
    n_synchronised: dict[str, int]
    n_groups: dict[str, int]
    model: str
    estimator: str = "ReLU firing patterns (output > 0) over the dataset, exact pattern equality"
    seed: int | None = None
    dtype: str = "float64"

    def groups(self, layer: str) -> list[np.ndarray]:
        """The unit indices of each synchronised group of ``layer``, largest group first."""
        ids = self.group_id[layer]
        return [np.flatnonzero(ids == g) for g in range(len(self.group_sizes[layer]))]


@dataclass(frozen=True, kw_only=True)
class DegeneracyResult(RecordedResult):
    """Free (degenerate) parameters of each weight matrix (``nn.Linear``) of a network on a dataset.

    For a weight matrix ``W`` (``fan_out x fan_in``, with bias) whose inputs ``x`` span an affine
    subspace of dimension ``input_rank`` and whose output Jacobians span ``gradient_rank``
    dimensions, a change of ``W`` reaches the output to first order only through its component in
    ``span(inputs) ⊗ span(output gradients)``, which has ``r_x * gradient_rank`` dimensions, with
    ``r_x = input_rank + 1`` for the bias coordinate. The count of free parameters is

    - ``free_from_activations = (fan_in - input_rank) * fan_out``: every input direction with zero
      variance on the data can be added to the weights and compensated by the bias;
    - ``free_from_gradients = r_x * (fan_out - gradient_rank)``: every output direction the rest of the
      network ignores on the data can be changed freely (a dead unit contributes its fan-in + 1 here
      and its fan-out in the next matrix's ``free_from_activations``);
    - the activation terms, from the positively homogeneous activation (``σ(a z) = a σ(z)`` for ``a > 0``:
      ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.PReLU``) that reads this matrix's output, directly or past flattening,
      dropout and identity layers, when an ``nn.Linear`` reads the activation's output (the moves are undone on
      the fan-out: a ReLU after the last layer frees none). Its units fall into groups with the same slope on
      every sample: each synchronised group (units that fire on the same samples, with the same negative slope),
      the units that act linearly on the data (always-on ReLUs; for a LeakyReLU or PReLU also the units whose
      input never exceeds 0), and each other unit whose slope is not 0 on every sample, on its own. The rows of
      a group of ``k`` units can move by ``δ[W|b]_g = A [W|b]_g`` for any ``k x k`` matrix ``A`` (mixing the
      units; the diagonal rescales them), and the linear units' biases by any ``e`` when this matrix and the next
      ``nn.Linear`` after the activation have a bias, each undone in that ``nn.Linear`` (``W_next -> W_next - W_next
      A``, ``b_next -> b_next - W_next e``) without changing the function on the data. The moves already among the
      rank terms (those that leave the output unchanged on their own) are not counted again: a group adds
      ``ρ_g * u_g`` directions, with ``ρ_g`` the rank of the output gradients restricted to the group (of the
      ``k x k`` block of the Jacobian Gram) and ``u_g`` the dimension of the span of the group's inputs
      ``z_j(s) = w_j · x_s + b_j`` on the data (with the constant function for the bias shifts), at most
      ``min(k, r_x)``. An always-on group of ``k`` units whose inputs have rank ``r`` and whose gradients have
      rank ``c`` (at most the number of outputs) adds ``min(k, c) * (min(k, r) + 1)``: ``k**2 + k`` only when
      ``k <= c`` and ``k <= r``. When combinations of units of several groups are ignored together by the rest
      of the network (the null space of the Jacobian Gram does not split over the groups) those groups' moves are
      counted together, exactly (beyond 2048 unknowns, from below). The count is reported in three parts:
    - ``free_from_rescaling``: the rescalings (scale a unit's fan-in by ``a > 0`` and its fan-out by ``1/a``), a
      symmetry of every ReLU network: one per unit that reaches the output (its diagonal entry of the Jacobian
      Gram above the rank threshold), fewer when units are copies of each other or their gradients are
      dependent (a unit the rest of the network ignores is already among the ``free_from_gradients`` directions);
    - ``free_from_bias_shift``: the bias shifts of the linear units that the rescalings do not already give (a
      unit's bias raised and the change undone in the next layer's bias): the rank of the Jacobian Gram
      restricted to the linear units when their inputs vary;
    - ``free_from_synchronised``: the rest, the mixing of units within a group (the linear units are one group):
      ``k**2 - k`` for a group of ``k`` units with ``k`` independent inputs and gradients, fewer when the group
      is larger than the ranks around it;
    - ``free_from_composition``: when the next ``nn.Linear`` reads this matrix's output unchanged
      (directly, or past flattening, dropout and identity layers), the invertible maps ``G`` of the
      hidden space (``W -> G W``, ``b -> G b``, ``W_next -> W_next G⁻¹``) and the bias moves between the
      two. Counted from the ranks, not from the width: of the directions of the chain of such
      matrices, those outside each matrix's ``span(inputs) ⊗ span(output gradients)`` number
      ``sum_a (gradient_rank_a - gradient_rank_{a-1}) * D_a`` with ``D_a`` the dimension of the span of
      the input functions of matrix ``a`` and of those after it; ``free_from_composition`` of a matrix
      is this chain's count less the rank terms, ``gradient_rank * (D_next + r_x - D)``, which is
      ``gradient_rank * r_x(next)`` when every matrix of the chain has a bias;
    - ``free_total``: their sum, at most ``n_parameters``; ``free_fraction = free_total / n_parameters``.

    The first two terms are the structural count ``n_parameters - r_x * gradient_rank`` split in two:
    the directions of this matrix alone outside ``span(inputs) ⊗ span(output gradients)``, the
    population-level quantity of Bushnaq et al. The activation terms add the moves of the units after the
    matrix that are not among them, so no direction is counted twice: ``total_free`` is the dimension of the
    null space of the Jacobian of the outputs with respect to all ``nn.Linear`` parameters when the samples
    pin the count down, the groups' slopes are linearly independent over the samples and the activations have
    no other symmetries (``lower_bound`` names the matrices where they can), and never more than it. It is not
    the null space on these samples where they give fewer Jacobian rows (``n_samples x n_outputs``, or
    ``n_samples`` for the loss) than ``r_x * gradient_rank``: then the samples leave more directions free than
    counted (such modules are listed in ``sample_limited``). Units whose firing pattern leaves few samples in
    some region of the input (firing on few samples, or differing from another unit on few), or whose patterns
    at different layers restrict one another, also free directions on these samples that the count misses.
    ``input_spectrum`` / ``gradient_spectrum`` hold the eigenvalues behind the ranks. Modules with
    parameters that are not ``nn.Linear`` (convolutions, BatchNorm) are listed in ``not_counted``, and
    so are ``nn.Linear`` layers applied along an axis of a larger input (their weights are shared
    over the other axes, which this count does not cover).
    ``lower_bound``: the modules whose count can miss continuous symmetries of the activations after
    them: a piecewise-linear activation that is not positively homogeneous (``nn.ReLU6``,
    ``nn.Hardtanh``, ``nn.Hardswish``, ...; units that stay on one linear piece over the data have
    rescalings and mixings of their own), a homogeneous one followed by another piecewise-linear
    activation, or a LeakyReLU or PReLU with units that act linearly on the data next to units whose
    slope changes (their combinations leave a few more directions free than counted); and a homogeneous
    activation whose groups' slopes are linearly dependent over the samples, with the constant function when
    there are linear units or the next ``nn.Linear`` has a bias (firing sets that add up to another group's,
    or to every sample: units that fire on complementary sets, as on data with a gap; always when the groups
    outnumber the samples), or whose groups the rest of the network ignores in combination: units of
    different groups can then stand in for one another, which frees directions not looked for. Other
    activations (tanh, sigmoid, GELU, SiLU, ELU) have none.
    ``dead_units`` counts the units of the activation whose slope is 0 on every sample (never firing
    ReLUs); ``always_on_units`` those with one slope on every sample (they act linearly on the data).
    ``sample_limited``: the modules whose count these samples do not pin down, for either reason:
    the input rank reached the most the samples allow (``n - 1`` centred, ``n`` without bias) below
    the fan-in, so that ``free_from_activations`` also counts directions the samples did not
    explore; or ``r_x * gradient_rank`` exceeds the number of rows of the Jacobian of the outputs
    with respect to the matrix (``n_samples x n_outputs`` for ``output="logits"``, ``n_samples`` for
    ``"loss"``), so that on these samples more directions leave the outputs unchanged than counted.
    More samples resolve both.
    ``caveats``: for each module in ``lower_bound`` or ``sample_limited``, which of the reasons above applies to it,
    in words.
    """

    modules: tuple[str, ...]
    fan_in: dict[str, int]
    fan_out: dict[str, int]
    n_parameters: dict[str, int]
    input_rank: dict[str, int]
    gradient_rank: dict[str, int]
    zero_variance_inputs: dict[str, int]
    dead_units: dict[str, int]
    always_on_units: dict[str, int]
    synchronised_group_sizes: dict[str, np.ndarray]
    free_from_activations: dict[str, int]
    free_from_gradients: dict[str, int]
    free_from_synchronised: dict[str, int]
    free_from_rescaling: dict[str, int]
    free_from_bias_shift: dict[str, int]
    free_from_composition: dict[str, int]
    free_total: dict[str, int]
    free_fraction: dict[str, float]
    input_spectrum: dict[str, np.ndarray]
    gradient_spectrum: dict[str, np.ndarray]
    total_parameters: int
    total_free: int
    not_counted: tuple[str, ...]
    rtol: float
    output: str
    model: str
    sample_limited: tuple[str, ...] = ()
    lower_bound: tuple[str, ...] = ()
    caveats: dict[str, str] = field(default_factory=dict)
    estimator: str = (
        "structural free parameters per weight matrix from activation rank, gradient rank, the firing patterns of "
        "positively homogeneous activations (ReLU, LeakyReLU, PReLU) and compositions of linear layers"
    )
    seed: int | None = None
    dtype: str = "float64"


@dataclass(frozen=True, kw_only=True)
class InteractionBasisResult(RecordedResult):
    """The interaction basis of a network's layers, built backwards from the output.

    ``layers``: the node layers in forward order; the last one is the model output (logits).
    Per layer:

    - ``width``: number of features (without the constant bias coordinate);
    - ``gram_eigenvalues``: eigenvalues ``D`` of the uncentred Gram ``mean_s f'_s f'_sᵀ`` of the
      activations with the bias folded in as a constant coordinate ``f' = (f, 1)`` (``width + 1``
      values; for the output layer the logits' Gram, ``width`` values), descending;
    - ``interaction_eigenvalues``: eigenvalues ``Λ`` of the Jacobian Gram ``M`` in whitened
      coordinates (for the output layer: ``D``), descending, truncated ones included;
    - ``basis_size``: number of kept directions (``Λ > rtol * max Λ``), at most ``width + 1``;
    - ``basis``: ``C`` of shape ``(width + 1, basis_size)``; the coordinates in the basis are
      ``f̂ = Cᵀ f'``; for the output layer ``C = U`` (``width x width``), the eigenvectors of the logits'
      Gram;
    - ``activations``: ``f̂`` for every sample, ``(n_samples, basis_size)``;
    - ``communities``: the Louvain community of each basis direction in the interaction graph (-1
      for directions outside the graph).

    ``edges["a->b"]``: ``(basis_size[b], basis_size[a])`` interaction strengths
    ``E_ij = mean_s (∂f̂ᵇ_i/∂f̂ᵃ_j · f̂ᵃ_j)²`` (the ``rib`` "squared" edge at the data points).
    ``modularity``: Newman modularity of the Louvain split of the graph of all layers;
    ``pair_modularity["a->b"]``: the same for the two-layer graph of each adjacent pair.
    In the basis, the activation Gram of a layer is ``diag(Λ)`` and the Gram of the Jacobians of the
    next layer's basis coordinates is the identity (on the kept directions).
    """

    layers: tuple[str, ...]
    width: dict[str, int]
    basis_size: dict[str, int]
    gram_eigenvalues: dict[str, np.ndarray]
    interaction_eigenvalues: dict[str, np.ndarray]
    basis: dict[str, np.ndarray]
    activations: dict[str, np.ndarray]
    edges: dict[str, np.ndarray]
    communities: dict[str, np.ndarray]
    modularity: float
    pair_modularity: dict[str, float]
    rtol: float
    graph_directions: int
    model: str
    estimator: str = (
        "interaction basis (Bushnaq et al. 2024), bias folded, Jacobians at the data points; "
        "Louvain communities, Newman modularity"
    )
    seed: int | None = 0
    dtype: str = "float64"

    def pairs(self) -> list[tuple[str, str]]:
        """The adjacent layer pairs ``(a, b)`` of :attr:`edges`, in forward order."""
        return list(zip(self.layers[:-1], self.layers[1:]))


# ---------------------------------------------------------------------------------------------
# model access


class _ChannelAffine(nn.Module):
    """A BatchNorm layer in evaluation mode as a per-channel scale and shift (the shift is a bias)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        var = bn.running_var if bn.running_var is not None else torch.ones(bn.num_features)
        mean = bn.running_mean if bn.running_mean is not None else torch.zeros(bn.num_features)
        scale = 1.0 / torch.sqrt(var.detach().double() + bn.eps)
        if bn.affine:
            scale = scale * bn.weight.detach().double()
        shift = -mean.detach().double() * scale
        if bn.affine:
            shift = shift + bn.bias.detach().double()
        self.weight = nn.Parameter(scale, requires_grad=False)
        self.bias = nn.Parameter(shift, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)


class _ChannelPReLU(nn.Module):
    """``nn.PReLU`` written with ``torch.where``, whose per-sample Jacobians ``vmap`` can take (the slope is
    shared, or one per channel along dimension 1)."""

    def __init__(self, prelu: nn.PReLU):
        super().__init__()
        self.weight = nn.Parameter(prelu.weight.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2) if self.weight.numel() > 1 else (1,) * x.ndim
        return torch.where(x > 0, x, x * self.weight.view(shape))


def _replace_batchnorm(module: nn.Module) -> None:
    """Replace BatchNorm layers by their evaluation-mode affine maps and ``nn.PReLU`` by :class:`_ChannelPReLU`."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, _ChannelAffine(child))
        elif isinstance(child, nn.PReLU):
            setattr(module, name, _ChannelPReLU(child))
        else:
            _replace_batchnorm(child)


@dataclass
class _Net:
    """A float64 working copy of a sequential model on the compute device."""

    seq: nn.Sequential
    names: list[str]
    name: str
    device: torch.device

    def position(self, layer: str) -> int:
        """Index of ``layer`` among the children; -1 for the input."""
        return -1 if layer == INPUT_LAYER else self.names.index(layer)

    def tail(self, start: int, stop: int) -> nn.Sequential:
        """The children after position ``start`` up to and including ``stop``."""
        return cast(nn.Sequential, self.seq[start + 1 : stop + 1])


def _network_check(module: Any, func: str) -> None:
    if not isinstance(module, nn.Module):
        raise ParameterError(
            f"{func} needs a model (a LoadedModel from load_model, or a torch.nn.Module). Got {type(module).__name__}."
        )
    if not isinstance(module, nn.Sequential) or len(module) == 0:
        raise ArchitectureError(
            f"{func} needs a model built as torch.nn.Sequential (such as the 'mlp' and 'cnn' architectures), so that the "
            f"network after a layer can be split off; got {type(module).__name__}, whose layers are not one plain sequence."
        )


def _without_inplace(module: nn.Module) -> None:
    """Turn off ``inplace`` on every submodule of a working copy that has it (``nn.ReLU(inplace=True)``, ...), so
    that stored activations keep their values and autograd can differentiate through the copy."""
    for sub in module.modules():
        if isinstance(getattr(sub, "inplace", None), bool):
            cast(Any, sub).inplace = False


def _network(model: Any, func: str, device: torch.device) -> _Net:
    module = model.module if hasattr(model, "module") else model
    _network_check(module, func)
    work = private_copy(module).eval()
    _without_inplace(work)
    _replace_batchnorm(work)
    work = work.to(device=device, dtype=torch.float64)
    for p in work.parameters():
        p.requires_grad_(False)
    names = [name for name, _ in work.named_children()]
    name = getattr(model, "name", type(module).__name__)
    return _Net(seq=work, names=names, name=str(name), device=device)


def _inputs(dataset: Any, func: str, device: torch.device, model: Any = None) -> torch.Tensor:
    """The dataset's inputs in float64 on ``device``; a loaded model's declared input is checked first, so that
    a dataset made for another model gets the same sentence as in :func:`~workbench.extract`."""
    x = getattr(dataset, "x", None)
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{func} needs a Dataset (from load_dataset or make_dataset). Got {type(dataset).__name__}.")
    if isinstance(model, LoadedModel) and isinstance(dataset, Dataset):
        check_inputs(model, dataset)
    if not x.dtype.is_floating_point:
        raise DataError(
            f"{func} needs real-valued inputs to differentiate through; dataset '{getattr(dataset, 'name', '?')}' holds "
            f"{x.dtype} values (token ids). Use a dataset of float features."
        )
    if x.shape[0] < 2:
        raise DataError(f"{func}: the dataset needs at least 2 samples. Got {x.shape[0]}.")
    return x.to(device=device, dtype=torch.float64)


def _layers(net: _Net, layers: Sequence[str] | str | None, func: str, *, allow_input: bool = True) -> list[str]:
    """Validate layer names and return them in forward order, without repeats."""
    if isinstance(layers, str):
        layers = [layers]
    valid = ([INPUT_LAYER] if allow_input else []) + net.names
    if layers is None or len(layers) == 0:
        raise ParameterError(f"{func} needs at least one layer. Layers: {format_choices(valid)}.")
    for layer in layers:
        if not isinstance(layer, str) or layer not in valid:
            raise UnknownLayerError(
                f"{func}: unknown layer {layer!r}.{did_you_mean(str(layer), valid)} Layers (top-level children of the "
                f"sequential model{', and input' if allow_input else ''}): {format_choices(valid)}."
            )
    return sorted(set(layers), key=net.position)


def _collect(
    net: _Net, x: torch.Tensor, positions: set[int], batch_size: int, func: str, progress: Progress = None
) -> dict[int, torch.Tensor]:
    """Outputs of the children at ``positions`` (-1 is the input), unflattened, for every sample; ``progress``
    is called after each batch."""
    chunks: dict[int, list[torch.Tensor]] = {p: [] for p in positions}
    last = max(positions)
    ticker = _Ticker(progress, math.ceil(x.shape[0] / batch_size))
    with torch.inference_mode():
        for start in range(0, x.shape[0], batch_size):
            h = x[start : start + batch_size]
            if -1 in chunks:
                chunks[-1].append(h)
            for i, child in enumerate(net.seq):
                if i > last:
                    break
                try:
                    h = child(h)
                except RuntimeError as exc:
                    raise DataError(
                        f"{func}: the model could not run on the dataset at layer '{net.names[i]}' ({str(exc).splitlines()[0]}); "
                        "check that the dataset matches the model's input."
                    ) from exc
                if i in chunks:
                    chunks[i].append(h)
            ticker.tick()
    return {p: torch.cat(c) for p, c in chunks.items()}


def _folded(tail: nn.Sequential) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``g(f, c)``: the tail on one sample ``f`` with every bias multiplied by the constant coordinate ``c``."""
    params = dict(tail.named_parameters())

    def g(f: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scaled = {k: (v * c if k.rsplit(".", 1)[-1] == "bias" else v) for k, v in params.items()}
        return functional_call(tail, scaled, (f.unsqueeze(0),)).reshape(-1)

    return g


def _plain(tail: nn.Sequential) -> Callable[[torch.Tensor], torch.Tensor]:
    def g(f: torch.Tensor) -> torch.Tensor:
        return tail(f.unsqueeze(0)).reshape(-1)

    return g


def _chunk(batch_size: int, n_out: int, n_in: int) -> int:
    return max(1, min(batch_size, _JACOBIAN_BYTES // max(1, 8 * n_out * n_in)))


class _Ticker:
    """Counts finished batches for a ``progress(done, total)`` callback."""

    def __init__(self, progress: Progress, total: int):
        self.progress, self.total, self.done = progress, max(total, 1), 0

    def tick(self, n: int = 1) -> None:
        self.done = min(self.done + n, self.total)
        if self.progress is not None:
            self.progress(self.done, self.total)


# ---------------------------------------------------------------------------------------------
# spectra


def _spectrum(gram: torch.Tensor, rtol: float) -> tuple[np.ndarray, int, float, float]:
    """Eigenvalues (descending, clipped at 0), rank above ``rtol * max``, effective rank, threshold."""
    ev = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0)
    top = float(ev[0]) if ev.numel() else 0.0
    threshold = rtol * top
    rank = int((ev > threshold).sum()) if top > 0 else 0
    if top > 0:
        p = ev[ev > 0] / ev.sum()
        eff = float(torch.exp(-(p * p.log()).sum()))
    else:
        eff = 0.0
    return ev.cpu().numpy(), rank, eff, threshold


def _centred_gram(x: torch.Tensor) -> torch.Tensor:
    xc = x - x.mean(0, keepdim=True)
    return xc.T @ xc / x.shape[0]


def _jacobian_gram(
    tail: nn.Sequential, acts: torch.Tensor, output: str, labels: torch.Tensor | None, batch_size: int, ticker: _Ticker
) -> torch.Tensor:
    """``mean_s J_sᵀ J_s`` of the tail's output (logits, or the per-sample loss) w.r.t. the flattened ``acts``."""
    n, shape = acts.shape[0], acts.shape[1:]
    d = int(np.prod(shape)) if len(shape) else 1
    gram = torch.zeros(d, d, dtype=torch.float64, device=acts.device)
    if output == "logits":
        g = _plain(tail)
        with torch.no_grad():
            n_out = int(g(acts[0]).numel())
        step = _chunk(batch_size, n_out, d)
        jac = vmap(jacrev(g))
        for start in range(0, n, step):
            j = jac(acts[start : start + step]).reshape(-1, d)
            gram += j.T @ j
            ticker.tick()
    elif labels is not None:

        def loss(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return nn.functional.cross_entropy(tail(f.unsqueeze(0)), y.unsqueeze(0))

        grad = vmap(torch.func.grad(loss))
        step = _chunk(batch_size, 1, d)
        for start in range(0, n, step):
            j = grad(acts[start : start + step], labels[start : start + step]).reshape(-1, d)
            gram += j.T @ j
            ticker.tick()
    return gram / n


def _labels(
    dataset: Any,
    n: int,
    func: str,
    device: torch.device,
    forward: Any = None,
    x: Any = None,
    *,
    has_output: bool = True,
) -> torch.Tensor:
    """The dataset's class labels for the cross-entropy; with ``forward`` and ``x``, checked against the number
    of outputs the model gives on one sample. ``has_output``: whether ``func`` takes ``output="logits"``."""
    y = getattr(dataset, "y", None)
    arr = as_labels(y, n, func=func)
    if not np.issubdtype(arr.dtype, np.integer):
        remedy = "Use output='logits' or a dataset" if has_output else "Use a dataset"
        raise DataError(
            f"{func}: the loss needs integer class labels for the cross-entropy; the dataset's labels are {arr.dtype}. "
            f"{remedy} with class labels."
        )
    if forward is not None and x is not None and arr.size:
        with torch.no_grad():
            try:
                width = int(forward(x[:1]).shape[-1])
            except RuntimeError as exc:
                raise DataError(
                    f"{func}: the model could not run on the dataset ({str(exc).splitlines()[0]}); check that the "
                    "dataset matches the model's input."
                ) from exc
        if int(arr.min()) < 0 or int(arr.max()) >= width:
            raise DataError(
                f"{func}: the labels run from {int(arr.min())} to {int(arr.max())} but the model has {width} outputs "
                f"(classes 0 to {width - 1}); use a dataset whose labels are the model's classes."
            )
    return torch.as_tensor(arr, dtype=torch.int64, device=device)


def _check_rtol(rtol: Any, func: str) -> float:
    """``rtol`` in (0, 1): at 1 no eigenvalue lies above the threshold, so every rank would be 0."""
    number = isinstance(rtol, (int, float, np.integer, np.floating)) and not isinstance(rtol, bool)
    if number and 0.0 < float(rtol) < 1.0:
        return float(rtol)
    raise ParameterError(f"The 'rtol' parameter of {func} must be a number in (0.0, 1.0). Got {rtol!r}.")


def _check_common(func: str, rtol: Any, batch_size: Any) -> tuple[float, int]:
    rtol = _check_rtol(rtol, func)
    batch_size = check_int(batch_size, "batch_size", func=func, low=1, high=1 << 16)
    return rtol, batch_size


# ---------------------------------------------------------------------------------------------
# public: layers and their activations


def sequential_layers(model: Any) -> list[str]:
    """The layer names the functions of this module accept: ``"input"`` and the model's top-level children.

    Raises :class:`~workbench.errors.ArchitectureError` for a model that is not an ``nn.Sequential``.
    """
    module = model.module if hasattr(model, "module") else model
    _network_check(module, "sequential_layers")
    return [INPUT_LAYER] + [name for name, _ in module.named_children()]


def default_layers(model: Any, dataset: Any, *, max_width: int = 1024) -> list[str]:
    """``"input"`` and the activation-function layers (ReLU, tanh, ...) with at most ``max_width`` features.

    A cheap, informative default set of node layers for :func:`interaction_basis` and the spectra.
    """
    func = "default_layers"
    max_width = check_int(max_width, "max_width", func=func, low=1)
    dev = torch.device("cpu")
    net = _network(model, func, dev)
    x = _inputs(dataset, func, dev, model)[:2]
    acts = [i for i, child in enumerate(net.seq) if isinstance(child, _ACTIVATION_TYPES)]
    widths = {p: t[0].numel() for p, t in _collect(net, x, set(acts), 2, func).items()} if acts else {}
    return [INPUT_LAYER] + [net.names[p] for p in acts if widths[p] <= max_width]


def layer_activations(
    model: Any,
    dataset: Any,
    layers: Sequence[str] | str,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: Progress = None,
) -> Activations:
    """The flattened activations of the given layers (``"input"`` and top-level children) on the dataset.

    Unlike :func:`~workbench.extract` nothing is pooled: a conv map ``(C, H, W)`` becomes ``C*H*W``
    features, the space the Jacobians of :func:`gradient_rank` live in. Returns an
    :class:`~workbench.Activations` (float32, on the CPU, pooling ``"flatten"``) keyed by the model's
    weights, the dataset and the layers.

    batch_size: samples per forward batch.
    device: where to compute (None: cuda > mps > cpu).
    progress: optional callable ``(done, total)`` called after each forward batch.
    """
    func = "layer_activations"
    batch_size = check_int(batch_size, "batch_size", func=func, low=1, high=1 << 16)
    dev = float64_device(resolve_device(device))
    net = _network(model, func, dev)
    x = _inputs(dataset, func, dev, model)
    names = _layers(net, layers, func)
    acts = _collect(net, x, {net.position(layer) for layer in names}, batch_size, func, progress)
    tensors = {layer: acts[net.position(layer)].reshape(x.shape[0], -1).float().cpu() for layer in names}
    model_sha = str(getattr(model, "sha256", ""))
    data_sha = str(getattr(dataset, "sha256", ""))
    model_key = str(getattr(model, "content_sha256", "") or model_sha)
    key = hashlib.sha256(f"{model_key}|{data_sha}|{','.join(names)}|flatten|{func}".encode()).hexdigest()
    return Activations(
        tensors,
        model_name=net.name,
        model_sha256=model_sha,
        dataset_name=str(getattr(dataset, "name", "")),
        dataset_sha256=data_sha,
        inputs_sha256=str(getattr(dataset, "inputs_sha256", "")),
        pooling="flatten",
        labels=getattr(dataset, "y", None),
        key=key if model_sha and data_sha else "",
    )


# ---------------------------------------------------------------------------------------------
# public: activation and gradient ranks


def activation_rank(
    acts: Mapping[str, Any] | Any, *, rtol: float = DEFAULT_RTOL, device: str | torch.device | None = None
) -> RankResult:
    """Spectrum, numerical rank and effective rank of each layer's centred activation covariance.

    The covariance of a layer with activations ``x: (n_samples, width)`` is ``Xcᵀ Xc / n`` with
    ``Xc`` the column-centred activations (float64). Its eigenvalues are the variances along its
    principal directions; a zero eigenvalue is a direction of activation space in which the layer
    does not vary on the data (source 1 of degeneracy: the weights reading this layer can change
    along it, compensated by the bias). The numerical rank counts eigenvalues above
    ``rtol * max(eigenvalue)``; the effective rank ``exp(entropy)`` of the normalised spectrum lies
    in ``[1, width]`` and says how many directions carry the variance. It uses the whole spectrum,
    not only the eigenvalues above the threshold, so it does not depend on ``rtol`` and can exceed
    the rank when ``rtol`` is large.

    acts: an :class:`~workbench.Activations` (or any mapping layer name -> ``(n_samples, width)``
        array), or one ``(n_samples, width)`` array (reported as layer ``"x"``).
    rtol: relative tolerance for the numerical rank, in (0, 1); the default 1e-8 counts directions
        with at least 1e-8 of the largest variance (1e-4 of its standard deviation). Larger values
        count nearly-flat directions as degenerate too.
    device: where to compute (None: cuda > mps > cpu).
    """
    func = "activation_rank"
    rtol = _check_rtol(rtol, func)
    start = time.perf_counter()
    dev = float64_device(resolve_device(device))
    mapping = dict(acts) if isinstance(acts, Mapping) else {"x": acts}
    if not mapping:
        raise DataError(f"{func}: 'acts' holds no layers; extract at least one layer first.")
    eig, rank, eff, width, thr = {}, {}, {}, {}, {}
    n = 0
    for layer, x in mapping.items():
        t = as_matrix(x, str(layer), func=func, device=dev)
        n = t.shape[0]
        eig[layer], rank[layer], eff[layer], thr[layer] = _spectrum(_centred_gram(t), rtol)
        width[layer] = t.shape[1]
    return RankResult(
        quantity="activation",
        layers=tuple(mapping),
        eigenvalues=eig,
        rank=rank,
        effective_rank=eff,
        width=width,
        threshold=thr,
        rtol=rtol,
        output=None,
        model=str(getattr(acts, "model_name", "")),
        n_samples=n,
        estimator="eigenvalues of the centred activation covariance (float64); rank: eigenvalues > rtol·max",
        params={"rtol": rtol},
        device=str(dev),
        seconds=time.perf_counter() - start,
    )


def gradient_rank(
    model: Any,
    dataset: Any,
    layers: Sequence[str] | str,
    *,
    output: str = "logits",
    rtol: float = DEFAULT_RTOL,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: Progress = None,
) -> RankResult:
    """Spectrum and rank of the Gram matrix of the output's Jacobians with respect to each layer.

    For each sample ``s``, ``J_s = ∂ output / ∂ f(s)`` where ``f(s)`` is the layer's (flattened)
    activation vector and the output is the rest of the network after the layer. The Gram matrix
    ``mean_s J_sᵀ J_s`` (``width x width``, float64) spans the directions of the layer that the output
    depends on; each zero eigenvalue is a direction the rest of the network ignores on the data
    (source 2 of degeneracy: the weights writing into the layer can change along it freely).

    model: a LoadedModel or ``torch.nn.Sequential`` (anything with a ``.module``); the layers are its
        top-level children, or ``"input"``.
    dataset: a Dataset whose inputs the model takes.
    layers: one layer name or several.
    output: ``"logits"`` (Jacobian of all logits; rank at most the number of classes per sample) or
        ``"loss"`` (gradient of the per-sample cross-entropy; needs class labels; rank at most
        ``n_samples``).
    rtol: relative tolerance for the rank, in (0, 1) (see :func:`activation_rank`).
    batch_size: samples per vectorised Jacobian batch (lowered automatically so one batch's
        Jacobians stay within 128 MiB).
    device: where to compute (None: cuda > mps > cpu).
    progress: optional callable ``(done, total)`` called after each batch.
    """
    func = "gradient_rank"
    output = check_choice(output, "output", OUTPUTS, func=func)
    rtol, batch_size = _check_common(func, rtol, batch_size)
    start = time.perf_counter()
    dev = float64_device(resolve_device(device))
    net = _network(model, func, dev)
    x = _inputs(dataset, func, dev, model)
    names = _layers(net, layers, func)
    labels = _labels(dataset, x.shape[0], func, dev, net.seq, x) if output == "loss" else None
    acts = _collect(net, x, {net.position(layer) for layer in names}, batch_size, func)
    ticker = _Ticker(progress, sum(_n_batches(net, acts, net.position(layer), output, batch_size) for layer in names))
    eig, rank, eff, width, thr = {}, {}, {}, {}, {}
    for layer in names:
        p = net.position(layer)
        gram = _jacobian_gram(net.tail(p, len(net.names) - 1), acts[p], output, labels, batch_size, ticker)
        eig[layer], rank[layer], eff[layer], thr[layer] = _spectrum(gram, rtol)
        width[layer] = gram.shape[0]
    what = "logits" if output == "logits" else "per-sample cross-entropy"
    return RankResult(
        quantity="gradient",
        layers=tuple(names),
        eigenvalues=eig,
        rank=rank,
        effective_rank=eff,
        width=width,
        threshold=thr,
        rtol=rtol,
        output=output,
        model=net.name,
        n_samples=int(x.shape[0]),
        estimator=f"eigenvalues of mean JᵀJ, J = ∂({what})/∂(layer) (float64, vmap·jacrev); rank: eigenvalues > rtol·max",
        params={"rtol": rtol, "output": output, "batch_size": batch_size},
        device=str(dev),
        seconds=time.perf_counter() - start,
    )


def _n_out(net: _Net, acts: dict[int, torch.Tensor], p: int) -> int:
    """Number of logits (the size of the model's output for one sample)."""
    with torch.no_grad():
        return int(net.tail(p, len(net.names) - 1)(acts[p][:1]).numel())


def _n_batches(net: _Net, acts: dict[int, torch.Tensor], p: int, output: str, batch_size: int) -> int:
    """Number of Jacobian batches :func:`_jacobian_gram` takes for the layer at position ``p``."""
    n_out = 1 if output == "loss" else _n_out(net, acts, p)
    return math.ceil(acts[p].shape[0] / _chunk(batch_size, n_out, acts[p][0].numel()))


# ---------------------------------------------------------------------------------------------
# public: ReLU patterns


def _relu_layers(net: _Net) -> list[str]:
    return [name for name, child in zip(net.names, net.seq) if isinstance(child, nn.ReLU)]


def _patterns(out: torch.Tensor, negative_slope: torch.Tensor | None = None) -> dict[str, Any]:
    """Dead / always-on masks, firing rates and synchronised groups of one ReLU output ``(n, ...)``.

    With ``negative_slope`` (one per unit) ``out`` is the input of a positively homogeneous activation and
    a group's units also share their negative slope, so that they have the same slope on every sample.
    """
    fires = out.reshape(out.shape[0], -1) > 0  # (n, units)
    count = fires.sum(0)
    n, width = fires.shape
    dead = count == 0
    on = count == n
    group_id = torch.full((width,), -1, dtype=torch.int64)
    sizes = np.zeros(0, dtype=np.int64)
    middle = torch.nonzero(~dead & ~on).flatten()
    if middle.numel() > 1:
        key = fires[:, middle].T.cpu().double()
        if negative_slope is not None:
            key = torch.cat([key, negative_slope[middle].cpu().double()[:, None]], dim=1)
        uniq, inverse, counts = torch.unique(key, dim=0, return_inverse=True, return_counts=True)
        big = torch.nonzero(counts > 1).flatten()
        if big.numel():
            # number groups by decreasing size, ties by first unit index
            first = torch.stack([torch.nonzero(inverse == g)[0] for g in big.tolist()]).flatten()
            order = sorted(range(big.numel()), key=lambda i: (-int(counts[big[i]]), int(first[i])))
            remap = torch.full((uniq.shape[0],), -1, dtype=torch.int64)
            for new, i in enumerate(order):
                remap[big[i]] = new
            group_id[middle.cpu()] = remap[inverse]
            sizes = np.array([int(counts[big[i]]) for i in order], dtype=np.int64)
    return {
        "width": width,
        "dead": dead.cpu().numpy(),
        "always_on": on.cpu().numpy(),
        "firing_rate": (count.double() / n).cpu().numpy(),
        "group_id": group_id.numpy(),
        "group_sizes": sizes,
    }


def relu_patterns(
    model: Any,
    dataset: Any,
    layers: Sequence[str] | str | None = None,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: Progress = None,
) -> ReluPatternResult:
    """Dead, always-on and synchronised ReLU units of a network on a dataset.

    A unit fires on a sample when its ReLU output is > 0. A *dead* unit never fires (its fan-in and
    fan-out are free parameters); an *always-on* unit fires on every sample (it acts linearly on this
    data); a *synchronised group* is a set of two or more other units that fire on exactly the same
    samples (source 3 of degeneracy: on the data such a group acts as one linear map that can be
    reparameterised by mixing its units). For convolutional ReLUs every element of the feature map
    is a unit.

    model: a LoadedModel or ``torch.nn.Sequential`` with ``nn.ReLU`` children.
    dataset: a Dataset whose inputs the model takes.
    layers: names of ``nn.ReLU`` children; None for all of them.
    batch_size: samples per forward batch.
    device: where to compute (None: cuda > mps > cpu).
    progress: optional callable ``(done, total)`` called after each forward batch.
    """
    func = "relu_patterns"
    batch_size = check_int(batch_size, "batch_size", func=func, low=1, high=1 << 16)
    start = time.perf_counter()
    dev = float64_device(resolve_device(device))
    net = _network(model, func, dev)
    x = _inputs(dataset, func, dev, model)
    relus = _relu_layers(net)
    if not relus:
        raise ArchitectureError(f"{func}: the model has no nn.ReLU layers; its layers are {format_choices(net.names)}.")
    names = relus if layers is None else _layers(net, layers, func, allow_input=False)
    for layer in names:
        if layer not in relus:
            raise ParameterError(
                f"{func}: layer '{layer}' is a {type(net.seq[net.position(layer)]).__name__}, not a ReLU; pick ReLU layers: "
                f"{format_choices(relus)}."
            )
    acts = _collect(net, x, {net.position(layer) for layer in names}, batch_size, func, progress)
    per = {layer: _patterns(acts[net.position(layer)]) for layer in names}
    pick = lambda key: {layer: per[layer][key] for layer in names}  # noqa: E731
    return ReluPatternResult(
        layers=tuple(names),
        width=pick("width"),
        dead=pick("dead"),
        always_on=pick("always_on"),
        firing_rate=pick("firing_rate"),
        group_id=pick("group_id"),
        group_sizes=pick("group_sizes"),
        n_dead={k: int(v["dead"].sum()) for k, v in per.items()},
        n_always_on={k: int(v["always_on"].sum()) for k, v in per.items()},
        n_synchronised={k: int(v["group_sizes"].sum()) for k, v in per.items()},
        n_groups={k: len(v["group_sizes"]) for k, v in per.items()},
        model=net.name,
        n_samples=int(x.shape[0]),
        params={"batch_size": batch_size},
        device=str(dev),
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------------------
# public: degeneracy summary


_PASS_THROUGH = (nn.Flatten, nn.Dropout, nn.Identity)  # identity maps on a flat input in evaluation mode
# positively homogeneous, σ(a z) = a σ(z) for a > 0, with slope 1 above 0 and a fixed slope below
_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, _ChannelPReLU)
# piecewise linear but not homogeneous (ReLU6 is a Hardtanh): units that stay on one piece over the data have
# symmetries of their own that the count does not look for
_PIECEWISE = (nn.Hardtanh, nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.Hardswish, nn.Hardsigmoid)


def _after_pass_through(net: _Net, position: int) -> int | None:
    """Position of the first child after ``position`` that is not a flattening, dropout or identity layer, or None."""
    for p in range(position + 1, len(net.names)):
        if not isinstance(net.seq[p], _PASS_THROUGH):
            return p
    return None


def _activation_after(net: _Net, position: int) -> int | None:
    """Position of the positively homogeneous activation (ReLU, LeakyReLU, PReLU) that reads the output of
    the child at ``position`` unchanged, or None."""
    p = _after_pass_through(net, position)
    return p if p is not None and isinstance(net.seq[p], _HOMOGENEOUS) else None


def _next_linear(net: _Net, position: int) -> int | None:
    """Position of the ``nn.Linear`` that reads the output of the child at ``position`` unchanged (past
    flattening, dropout and identity layers), or None."""
    p = _after_pass_through(net, position)
    return p if p is not None and isinstance(net.seq[p], nn.Linear) else None


def _negative_slope(act: nn.Module, width: int, device: torch.device) -> torch.Tensor:
    """The slope below 0 of each of the ``width`` units of a positively homogeneous activation."""
    if isinstance(act, _ChannelPReLU):
        return act.weight.detach().to(device=device, dtype=torch.float64).expand(width).clone()
    slope = float(act.negative_slope) if isinstance(act, nn.LeakyReLU) else 0.0
    return torch.full((width,), slope, dtype=torch.float64, device=device)


def _count_is_lower_bound(net: _Net, position: int) -> str:
    """Why the activations after the matrix at ``position`` can have continuous symmetries that are not counted,
    "" when they have none: a piecewise-linear activation that is not homogeneous (ReLU6, Hardtanh, ...), or a
    homogeneous one followed by another piecewise-linear activation."""
    p = _after_pass_through(net, position)
    if p is None:
        return ""
    if isinstance(net.seq[p], _PIECEWISE):
        return (f"its activation {type(net.seq[p]).__name__} is piecewise linear but not positively homogeneous: units "
                "that stay on one linear piece have rescalings and mixings of their own")
    if isinstance(net.seq[p], _HOMOGENEOUS):
        q = _after_pass_through(net, p)
        if q is not None and isinstance(net.seq[q], _HOMOGENEOUS + _PIECEWISE):
            return (f"its activation {type(net.seq[p]).__name__} is followed by another piecewise-linear one, "
                    f"{type(net.seq[q]).__name__}")
    return ""


# the exact count of the mixing directions of groups whose ignored directions overlap solves for this many unknowns at
# most (overlapping directions x the dimension of the span of the groups' input functions); above it a lower bound
_OVERLAP_UNKNOWNS = 2048


def _input_coordinates(layer: nn.Linear, xin: torch.Tensor, rank: int) -> torch.Tensor:
    """The functions ``z_j(s) = w_j · x_s + b_j`` computed by the matrix's units on the data, ``(fan_out, r_x)``:
    coordinates in an orthonormal basis (mean over the samples) of the functions the inputs span: the constant
    function first (with a bias), then the ``rank`` leading principal directions of the inputs (centred with a bias)."""
    if layer.bias is None:
        ev, vec = _eigh_desc(xin.T @ xin / xin.shape[0])
        return layer.weight @ (vec[:, :rank] * ev[:rank].sqrt())
    ev, vec = _eigh_desc(_centred_gram(xin))
    constant = layer.weight @ xin.mean(0) + layer.bias
    return torch.cat([constant[:, None], layer.weight @ (vec[:, :rank] * ev[:rank].sqrt())], dim=1)


def _row_span(rows: torch.Tensor, rtol: float) -> torch.Tensor:
    """Orthonormal basis (columns) of the span of unit-length ``rows``; singular values count above ``sqrt(rtol)`` of
    the largest."""
    if rows.shape[0] == 0:
        return rows.new_zeros(rows.shape[1], 0)
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    return vh[s**2 > rtol * s[0] ** 2].T


def _generator_ranks(
    gram: torch.Tensor, threshold: float, unit: torch.Tensor, units: torch.Tensor, shifted: torch.Tensor
) -> tuple[int, int]:
    """How many independent output changes the rescalings of ``units`` make, alone and with the bias shifts of
    ``shifted``. A rescaling moves row ``j`` of the matrix by its own function ``unit[j]``, a shift by the constant
    function (coordinate 0); two such moves reach the output with Gram ``G_ij <f, f'>``."""
    idx = torch.cat([units, shifted])
    functions = unit[idx].clone()
    functions[units.numel() :] = 0.0
    functions[units.numel() :, 0] = 1.0
    gamma = gram[idx][:, idx] * (functions @ functions.T)
    k = units.numel()
    alone = int((torch.linalg.eigvalsh(gamma[:k, :k]) > threshold).sum()) if k else 0
    both = int((torch.linalg.eigvalsh(gamma) > threshold).sum()) if idx.numel() else 0
    return alone, both


def _symmetry_directions(
    gram: torch.Tensor,
    threshold: float,
    gradient_rank: int,
    coordinates: Callable[[], torch.Tensor],
    singles: torch.Tensor,
    groups: list[torch.Tensor],
    shifted: int | None,
    rtol: float,
) -> tuple[int, int, int, bool]:
    """Directions of one weight matrix freed by the activation after it, beyond ``span(inputs) ⊗ span(gradients)``.

    Unit ``j`` alone (``singles``) or a group of units with the same slope on every sample (``groups``: synchronised
    groups, and the linear units) can have its rows moved by any combination ``δ[W|b]_g = A [W|b]_g`` (plus ``e ⊗ 1``
    for the bias shifts of the group ``groups[shifted]``), undone in the next matrix. Such a move is already a free
    direction of this matrix when it leaves the output unchanged on its own, so the new directions are the rank of
    ``A ↦ P_R A Z``: the sum over groups of ``V_g ⊗ U_g``, with ``V_g`` the output gradients restricted to the group
    (dimension ``ρ_g``, the rank of ``G_gg``) and ``U_g`` the span of the group's functions ``z_j`` on the data (with
    the constant function for the shifted group; dimension ``u_g``). When the ignored directions of ``gram`` split
    over the groups (``sum ρ_g`` equals ``gradient_rank``) the sum is direct and the count is ``sum ρ_g u_g``;
    otherwise the ``δ = sum ρ_g - gradient_rank`` combinations of groups the output ignores remove the ``F`` with
    ``Ŷ_g F (I - P_{U_g}) = 0`` for every group, solved on the groups they touch.

    gram: ``(m, m)`` Jacobian Gram of the output w.r.t. the matrix's outputs; threshold: its rank threshold.
    coordinates: ``() -> (m, r)`` the units' functions (:func:`_input_coordinates`), asked for only when needed.
    Returns ``(rescaling, bias shifts, mixing, overlapping)``: the count in three parts (rescalings first, then
    shifts), and whether combinations of groups are ignored together (units of different groups may then stand in
    for one another, which these moves do not cover; beyond ``_OVERLAP_UNKNOWNS`` unknowns the touched groups are
    counted from below).
    """
    reach = gram.diagonal()[singles] > threshold
    ranks, gradient_bases = [], []
    for idx in groups:
        ev, vec = torch.linalg.eigh(gram[idx][:, idx])
        ranks.append(int((ev > threshold).sum()))
        gradient_bases.append(vec[:, ev > threshold])
    overlap = int(reach.sum()) + sum(ranks) - gradient_rank
    if not groups and overlap <= 0:
        return int(reach.sum()), 0, 0, False
    z = coordinates()
    norms = z.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, z / norms.clamp_min(torch.finfo(z.dtype).tiny), 0.0)
    const = unit.new_zeros(1, unit.shape[1])
    const[0, 0] = 1.0
    empty = singles[:0]
    with_constant = [torch.cat([unit[idx], const]) if g == shifted else unit[idx] for g, idx in enumerate(groups)]
    spans = [_row_span(rows, rtol) for rows in with_constant]
    # (total, rescalings, rescalings and shifts) of each part counted on its own: the singles, then each group
    parts = [(int(reach.sum()), int(reach.sum()), int(reach.sum()))]
    for g, idx in enumerate(groups):
        alone, both = _generator_ranks(gram, threshold, unit, idx, idx if g == shifted else empty)
        parts.append((ranks[g] * spans[g].shape[1], alone, both))
    if overlap > 0:
        # combinations of units of different groups the output ignores: one basis Ŷ of them, each group's block
        # projected onto the directions of the group the output sees
        ev, vec = torch.linalg.eigh(gram)
        ignored = vec[:, ev <= threshold]
        y = torch.zeros_like(ignored)
        y[singles] = ignored[singles] * reach[:, None]
        for idx, basis in zip(groups, gradient_bases):
            y[idx] = basis @ (basis.T @ ignored[idx])
        left, sv, _ = torch.linalg.svd(y, full_matrices=False)
        overlap = min(overlap, int((sv**2 > rtol).sum()))  # within rounding of the two ranks
    if overlap > 0:
        y_hat = left[:, :overlap]
        weight = (y_hat**2).sum(1)
        touched = singles[weight[singles] > rtol]
        linked = [g for g, idx in enumerate(groups) if float(weight[idx].sum()) > rtol]
        parts = [parts[0]] + [p for g, p in enumerate(parts[1:]) if g not in linked]
        # the touched parts, counted together: rank = sum ρ_g u_g - dim{F : Ŷ_g F (I - P_{U_g}) = 0 for every g}, with
        # F's rows in the span of the touched groups' functions
        omega = _row_span(torch.cat([unit[touched]] + [spans[g].T for g in linked]), rtol)
        width = omega.shape[1]
        sizes = int(touched.numel()) + sum(ranks[g] * spans[g].shape[1] for g in linked)
        alone, both = _generator_ranks(
            gram,
            threshold,
            unit,
            torch.cat([touched] + [groups[g] for g in linked]),
            groups[shifted] if shifted in linked else empty,
        )
        if width * overlap <= _OVERLAP_UNKNOWNS:
            a, b = unit[touched] @ omega, y_hat[touched]
            v = (a[:, :, None] * b[:, None, :]).reshape(-1, width * overlap)
            h = torch.kron(torch.eye(width, dtype=z.dtype, device=z.device), b.T @ b) - v.T @ v
            for g in linked:
                a, b = omega.T @ spans[g], y_hat[groups[g]]
                h += torch.kron(torch.eye(width, dtype=z.dtype, device=z.device) - a @ a.T, b.T @ b)
            total = sizes - int((torch.linalg.eigvalsh(h) <= rtol).sum())
        else:
            total = max(both, sizes - width * overlap)  # a lower bound: too many unknowns to solve for
        parts[0] = (parts[0][0] - int(touched.numel()),) * 3
        parts.append((total, alone, both))
    rescaled = shifts = mixed = 0
    for total, alone, both in parts:
        both = min(both, total)  # within rounding the rescalings and shifts are among the directions counted
        alone = min(alone, both)
        rescaled, shifts, mixed = rescaled + alone, shifts + both - alone, mixed + total - both
    return rescaled, shifts, mixed, overlap > 0


def _indices(mask: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.flatnonzero(mask), device=device)


def _slopes_dependent(z: torch.Tensor, slope: torch.Tensor, units: torch.Tensor, constant: bool) -> bool:
    """Whether the slopes of ``units`` over the samples (``z``: the activation's inputs ``(n, m)``; ``slope``: each
    unit's slope below 0), with the constant function when ``constant``, are linearly dependent."""
    columns = torch.where(z[:, units] > 0, 1.0, slope[units])
    if constant:
        columns = torch.cat([columns, torch.ones_like(z[:, :1])], dim=1)
    return columns.shape[1] > 0 and int(torch.linalg.matrix_rank(columns)) < columns.shape[1]


def degeneracy_summary(
    model: Any,
    dataset: Any,
    *,
    output: str = "logits",
    rtol: float = DEFAULT_RTOL,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: Progress = None,
) -> DegeneracyResult:
    """Free (degenerate) parameters of every ``nn.Linear`` weight matrix of a sequential network.

    For each weight matrix ``W`` (``fan_out x fan_in``) with bias: the rank ``input_rank`` of the
    centred covariance of its inputs (:func:`activation_rank`), the rank ``gradient_rank`` of the
    Jacobian Gram of the output with respect to its outputs (:func:`gradient_rank`) and the ReLU
    firing patterns of the positively homogeneous activation (ReLU, LeakyReLU, PReLU) right after it
    (:func:`relu_patterns`) give

    ``free_total = min(n_parameters, (fan_in - input_rank) * fan_out + (input_rank + 1) * (fan_out - gradient_rank)
    + sum_groups ρ_g u_g + compositions)``,

    see :class:`DegeneracyResult` for each term. The first two terms are the structural count for the
    matrix varied alone, ``n_parameters - (input_rank + 1) * gradient_rank``: the directions outside
    ``span(inputs) ⊗ span(output gradients)`` (the population-level quantity of Bushnaq et al.), not
    the null space of the Jacobian of the outputs on these samples, which is larger where the samples
    give fewer Jacobian rows (``n_samples x n_outputs``, or ``n_samples`` for the loss) than
    ``(input_rank + 1) * gradient_rank``; such matrices are listed in ``sample_limited``. The
    activation terms count the moves of the units after the matrix (rescalings, bias shifts of the linear
    units, mixings of units that have the same slope on every sample, undone in the next ``nn.Linear``)
    that are not among the rank terms: a group of ``k`` units adds ``ρ_g u_g``, the rank ``ρ_g`` of its
    output gradients times the dimension ``u_g`` of the span of its inputs (with the constant for the bias
    shifts), which is less than ``k**2`` (plus ``k``) when the group is larger than the ranks around it.
    Summed over the matrices, the count equals the dimension of the null space of the Jacobian of the
    outputs with respect to all ``nn.Linear`` parameters when the samples pin it down and the activations
    have no symmetries it does not look for, and never exceeds it (at the same ``rtol``). ``compositions``
    counts the invertible maps between an ``nn.Linear`` and the next one reading its output unchanged, from
    the ranks. Matrices followed by activations with symmetries the count does not look for (ReLU6,
    Hardtanh, ...; groups of units whose slopes over the samples are linearly dependent, as for units that
    fire on complementary sets) are listed in ``lower_bound``.
    For a matrix without bias, ``input_rank`` is the rank of the uncentred Gram and no ``+ 1`` is
    added. ``nn.Linear`` layers applied along an axis of a larger input are not counted (they are
    listed in ``not_counted``).

    model: a LoadedModel or ``torch.nn.Sequential``.
    dataset: a Dataset whose inputs the model takes.
    output: ``"logits"`` (degenerate = leaves every logit unchanged; the default) or ``"loss"``
        (leaves every per-sample cross-entropy unchanged to first order; needs class labels).
    rtol: relative tolerance for all ranks, in (0, 1) (see :func:`activation_rank`).
    batch_size: samples per vectorised Jacobian batch.
    device: where to compute (None: cuda > mps > cpu).
    progress: optional callable ``(done, total)`` called after each Jacobian batch.
    """
    func = "degeneracy_summary"
    output = check_choice(output, "output", OUTPUTS, func=func)
    rtol, batch_size = _check_common(func, rtol, batch_size)
    start = time.perf_counter()
    dev = float64_device(resolve_device(device))
    net = _network(model, func, dev)
    x = _inputs(dataset, func, dev, model)
    n = int(x.shape[0])
    labels = _labels(dataset, n, func, dev, net.seq, x) if output == "loss" else None
    linear = [i for i, child in enumerate(net.seq) if isinstance(child, nn.Linear)]
    if not linear:
        raise ArchitectureError(
            f"{func}: the model has no nn.Linear layers to count; its layers are {format_choices(net.names)}."
        )
    activation = {i: a for i in linear if (a := _activation_after(net, i)) is not None}
    wanted = {i - 1 for i in linear} | set(linear)
    acts = _collect(net, x, wanted, batch_size, func)
    flat = [i for i in linear if acts[i - 1].ndim == 2]
    if not flat:
        raise ArchitectureError(
            f"{func}: every nn.Linear layer of the model ({format_choices([net.names[i] for i in linear])}) is applied "
            "along an axis of a larger input, which this count does not cover; use a model with an nn.Linear layer "
            "on flat inputs."
        )
    not_counted = tuple(
        name
        for i, (name, child) in enumerate(zip(net.names, net.seq))
        if (isinstance(child, nn.Linear) and i not in flat)
        or (not isinstance(child, nn.Linear) and any(True for _ in child.parameters()))
    )
    last = len(net.names) - 1
    with torch.no_grad():
        n_rows = n * int(net.seq(x[:1]).numel()) if output == "logits" else n
    total_batches = sum(_n_batches(net, acts, i, output, batch_size) for i in flat)
    ticker = _Ticker(progress, total_batches)

    rows: dict[int, dict[str, Any]] = {}
    centred_rank: dict[int, int] = {}
    for i in flat:
        layer = cast(nn.Linear, net.seq[i])
        fan_in, fan_out, has_bias = layer.in_features, layer.out_features, layer.bias is not None
        xin = acts[i - 1]
        centred = _centred_gram(xin)
        spec, r_in, _, _ = _spectrum(centred if has_bias else xin.T @ xin / n, rtol)
        centred_rank[i] = r_in if has_bias else _spectrum(centred, rtol)[1]
        r_x = r_in + int(has_bias)
        gram = _jacobian_gram(net.tail(i, last), acts[i], output, labels, batch_size, ticker)
        gspec, r_g, _, g_threshold = _spectrum(gram, rtol)
        n_params = fan_out * (fan_in + int(has_bias))
        sizes, n_dead, n_on, n_rescaled, n_shifted, n_mixed = np.zeros(0, dtype=np.int64), 0, 0, 0, 0, 0
        partly_linear, tangled = False, False
        if i in activation:
            slope = _negative_slope(net.seq[activation[i]], fan_out, gram.device)
            pat = _patterns(acts[i], slope)  # the sign of the activation's input sets each unit's slope
            linear_unit = slope.cpu().numpy() != 0
            dead = pat["dead"] & ~linear_unit  # slope 0 on every sample
            on = pat["always_on"] | (pat["dead"] & linear_unit)  # one slope on every sample: linear on the data
            n_dead, n_on = int(dead.sum()), int(on.sum())
            # units linear on the data next to units whose slope changes but is never 0 leave directions uncounted
            partly_linear = bool(n_on and (linear_unit & ~on).any())
            sizes = pat["group_sizes"]
            nxt = _next_linear(net, activation[i])
            if nxt is not None:  # mixing and rescaling are undone on the fan-out: no Linear after it, no symmetry
                groups = [_indices(pat["group_id"] == g, dev) for g in range(len(sizes))] + (
                    [_indices(on, dev)] if n_on else []
                )
                # the biases of the linear units move into the next layer's bias when both layers have one
                bias_next = cast(nn.Linear, net.seq[nxt]).bias is not None
                shift = n_on and has_bias and nxt in flat and bias_next
                singles = _indices(~dead & ~on & (pat["group_id"] < 0), dev)
                n_rescaled, n_shifted, n_mixed, overlapping = _symmetry_directions(
                    gram,
                    g_threshold,
                    r_g,
                    partial(_input_coordinates, layer, xin, r_in),
                    singles,
                    groups,
                    len(groups) - 1 if shift else None,
                    rtol,
                )
                # slopes of groups that add up to another group's (or to the constant the next layer adds) let
                # units of different groups stand in for each other: directions of their own, not counted
                firing = torch.cat([singles] + [idx[:1] for idx in groups[: len(sizes)]])
                tangled = overlapping or _slopes_dependent(acts[i], slope, firing, n_on > 0 or bias_next)
        rows[i] = {
            "fan_in": fan_in,
            "fan_out": fan_out,
            "n_parameters": n_params,
            "input_rank": r_in,
            "gradient_rank": r_g,
            "zero_variance_inputs": fan_in - r_in,
            "dead_units": n_dead,
            "always_on_units": n_on,
            "synchronised_group_sizes": sizes,
            "free_from_activations": (fan_in - r_in) * fan_out,
            "free_from_gradients": r_x * (fan_out - r_g),
            "free_from_synchronised": n_mixed,
            "free_from_rescaling": n_rescaled,
            "free_from_bias_shift": n_shifted,
            "input_spectrum": spec,
            "gradient_spectrum": gspec,
            "sample_limited": "; ".join(
                ([f"its input rank {r_in} reached the most {n} samples allow, below its fan-in {fan_in}, so the count "
                  "includes directions the samples never explored"] if r_in >= n - int(has_bias) and r_in < fan_in else [])
                + ([f"the samples give {n_rows:,} Jacobian rows, fewer than the {r_x * r_g:,} directions counted as used, "
                    "so more directions are free on them than counted"] if r_x * r_g > n_rows else [])),
            "lower_bound": "; ".join(
                [reason for reason in [_count_is_lower_bound(net, i)] if reason]
                + (["some of its units act linearly on these samples next to units whose slope changes"] if partly_linear else [])
                + (["the firing patterns of its groups of units over these samples add up to one another's (or to every "
                    "sample), so units of different groups can stand in for one another"] if tangled else [])),
        }

    # chains of nn.Linear layers that read each other's outputs unchanged: the directions of the whole chain
    # outside span(inputs) ⊗ span(output gradients) of each matrix, less those of the matrices alone
    following = {i: j for i in flat if (j := _next_linear(net, i)) is not None and j in flat}
    biased = {i: cast(nn.Linear, net.seq[i]).bias is not None for i in flat}
    spanned: dict[int, int] = {}  # dimension of the span of the input functions of this matrix and those after it
    for i in reversed(flat):
        j, later_bias = following.get(i), False
        while j is not None:
            later_bias, j = later_bias or biased[j], following.get(j)
        r_x = rows[i]["input_rank"] + int(biased[i])
        spanned[i] = centred_rank[i] + 1 if later_bias and not biased[i] else r_x
    for i in flat:
        row = rows[i]
        r_x = row["input_rank"] + int(biased[i])
        row["free_from_composition"] = (
            row["gradient_rank"] * (spanned[following[i]] + r_x - spanned[i]) if i in following else 0
        )
        terms = (
            "free_from_activations",
            "free_from_gradients",
            "free_from_synchronised",
            "free_from_rescaling",
            "free_from_bias_shift",
            "free_from_composition",
        )
        row["free_total"] = min(row["n_parameters"], sum(row[k] for k in terms))
        row["free_fraction"] = row["free_total"] / row["n_parameters"]
    named = {net.names[i]: rows[i] for i in flat}
    caveats = {}
    for name, row in named.items():
        why = [f"a lower bound: {reason}" for reason in [row["lower_bound"]] if reason]
        why += [f"not pinned down by the samples: {reason}" for reason in [row["sample_limited"]] if reason]
        if why:
            caveats[name] = "; ".join(why)
    limited = tuple(name for name, row in named.items() if row.pop("sample_limited"))
    lower = tuple(name for name, row in named.items() if row.pop("lower_bound"))
    out: dict[str, Any] = {key: {name: row[key] for name, row in named.items()} for key in next(iter(named.values()))}
    names = tuple(net.names[i] for i in flat)
    return DegeneracyResult(
        modules=names,
        **out,
        total_parameters=int(sum(out["n_parameters"].values())),
        total_free=int(sum(out["free_total"].values())),
        not_counted=not_counted,
        rtol=rtol,
        output=output,
        model=net.name,
        sample_limited=limited,
        lower_bound=lower,
        caveats=caveats,
        n_samples=n,
        params={"rtol": rtol, "output": output, "batch_size": batch_size},
        device=str(dev),
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------------------
# public: interaction basis


def _eigh_desc(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ev, vec = torch.linalg.eigh((m + m.T) / 2)
    return ev.flip(0).clamp_min(0.0), vec.flip(1)


def _signs(f_hat: torch.Tensor) -> torch.Tensor:
    """Signs that make each basis direction's largest-magnitude coordinate over the data positive."""
    if f_hat.numel() == 0:
        return torch.ones(f_hat.shape[1], dtype=f_hat.dtype, device=f_hat.device)
    idx = f_hat.abs().argmax(0)
    sign = torch.sign(f_hat[idx, torch.arange(f_hat.shape[1], device=f_hat.device)])
    sign[sign == 0] = 1.0
    return sign


def _with_constant(tail: Callable) -> Callable:
    """``(f, c) -> (tail(f, c), c)``: the next layer's folded coordinates (its constant coordinate is ``c`` itself)."""

    def h(f: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.cat([tail(f, c), c.reshape(1)])

    return h


def _basis_jacobians(h: Callable, f: torch.Tensor, c_next: torch.Tensor, step: int) -> Callable[[], Any]:
    """Iterate ``(start, J)`` over batches of ``step`` samples; ``J: (b, k, d + 1)`` is the Jacobian of the next
    layer's basis coordinates ``c_nextᵀ h(f, c)`` w.r.t. this layer's folded coordinates ``(f, c)`` at ``c = 1``.

    Reverse mode pulls back the ``k`` basis directions (one pass each), forward mode pushes ``d + 1``
    tangents and projects; the cheaper one is used.
    """
    n, d = f.shape[0], int(np.prod(f.shape[1:]))
    k = c_next.shape[1]
    one = torch.ones((), dtype=torch.float64, device=f.device)
    cotangents = c_next.T.contiguous()

    if k <= d + 1:

        def rows(fs: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            pull = torch.func.vjp(h, fs, c)[1]
            return vmap(pull)(cotangents)

        jac = vmap(rows, in_dims=(0, None))
    else:
        jac = vmap(torch.func.jacfwd(h, argnums=(0, 1)), in_dims=(0, None))

    def run():
        for start in range(0, n, step):
            jf, jc = jac(f[start : start + step], one)
            b = jf.shape[0]
            if k <= d + 1:
                yield start, torch.cat([jf.reshape(b, k, d), jc.reshape(b, k, 1)], dim=2)
            else:
                a = torch.cat([jf.reshape(b, -1, d), jc.reshape(b, -1, 1)], dim=2)
                yield start, cotangents @ a

    return run


def _graph(result_edges: list[np.ndarray], sizes: list[int], k: int) -> nx.Graph:
    """Graph over the first ``k`` basis directions of each layer; each adjacent pair's edges sum to 1."""
    graph = nx.Graph()
    for layer, size in enumerate(sizes):
        graph.add_nodes_from((layer, j) for j in range(min(size, k)))
    for layer, e in enumerate(result_edges):
        sub = e[: min(sizes[layer + 1], k), : min(sizes[layer], k)]
        total = float(sub.sum())
        if total <= 0:
            continue
        w = np.round(sub / total, 12)
        rows, cols = np.nonzero(w > 0)
        graph.add_weighted_edges_from(
            ((layer, int(j)), (layer + 1, int(i)), float(w[i, j])) for i, j in zip(rows, cols)
        )
    return graph


def _louvain(graph: nx.Graph, seed: int) -> tuple[list[set], float]:
    if graph.number_of_edges() == 0:
        return [{node} for node in graph.nodes], 0.0
    parts = nx.community.louvain_communities(graph, weight="weight", seed=seed)
    parts = sorted(parts, key=lambda s: min(s))
    return parts, float(nx.community.modularity(graph, parts, weight="weight"))


def interaction_basis(
    model: Any,
    dataset: Any,
    layers: Sequence[str] | str,
    *,
    rtol: float = DEFAULT_RTOL,
    graph_directions: int = 64,
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: Progress = None,
) -> InteractionBasisResult:
    """The interaction basis of the given layers, and the modularity of the interactions between them.

    Built backwards from the output as in the authors' reference code (``rib``, Bushnaq et al. 2024).
    The output layer's basis is ``U``, the eigenvectors of its logits' Gram. Then for each layer, last
    first, with activations ``f'_s = (f_s, 1)`` (bias folded in as a constant coordinate):

    1. ``G = mean_s f'_s f'_sᵀ = U D Uᵀ`` (float64); keep the directions with ``D > rtol * max D``;
    2. whiten: ``z = D^-1/2 Uᵀ f'``;
    3. ``M = mean_s J_sᵀ J_s = V Λ Vᵀ`` with ``J_s = ∂ f̂^{next}_s / ∂ z`` the Jacobian of the next
       layer's (already transformed) basis coordinates; keep the directions with ``Λ > rtol * max Λ``;
    4. ``C = U D^-1/2 V Λ^1/2``; the basis coordinates are ``f̂ = Cᵀ f'``.

    The derivative with respect to the constant coordinate is the derivative with respect to a
    common factor of every bias between the two layers, and the next layer's constant coordinate
    follows it with derivative 1, as in a network with folded biases. In the basis the activation
    Gram is ``diag(Λ)`` and the Jacobian Gram is the identity. Directions with no variance, and
    directions the next layer ignores, drop out, so the basis is the same for any
    reparameterisation that exploits those degeneracies (and any permutation of hidden units).

    The interaction graph has one node per basis direction (the first ``graph_directions`` of each
    layer, by ``Λ``) and, between adjacent layers, edges ``E_ij = mean_s (∂f̂ᵇ_i/∂f̂ᵃ_j · f̂ᵃ_j)²``
    (the ``rib`` squared edge at the data points), normalised to sum 1 per layer pair. Communities
    come from Louvain (Blondel et al. 2008; networkx, seeded); their quality is Newman's weighted
    modularity ``Q = (1/2m) sum_ij [A_ij - k_i k_j / 2m] δ(c_i, c_j)`` (Newman 2004, "Analysis of
    weighted networks"), in ``[-1/2, 1)``: 0 for a split no better than chance, near 1 for
    separate modules.

    model: a LoadedModel or ``torch.nn.Sequential``.
    dataset: a Dataset whose inputs the model takes.
    layers: node layers (top-level children, or ``"input"``); the output is always added last.
    rtol: relative truncation tolerance for ``D`` and ``Λ``, in (0, 1).
    graph_directions: how many leading basis directions of each layer enter the interaction graph
        (1-4096); more gives a fuller graph and a slower Louvain.
    seed: seed of the Louvain community search.
    batch_size: samples per vectorised Jacobian batch (lowered automatically to bound memory).
    device: where to compute (None: cuda > mps > cpu).
    progress: optional callable ``(done, total)`` called after each Jacobian batch.
    """
    func = "interaction_basis"
    rtol, batch_size = _check_common(func, rtol, batch_size)
    graph_directions = check_int(graph_directions, "graph_directions", func=func, low=1, high=4096)
    seed = check_seed(seed, func=func)
    start_time = time.perf_counter()
    dev = float64_device(resolve_device(device))
    net = _network(model, func, dev)
    x = _inputs(dataset, func, dev, model)
    n = int(x.shape[0])
    last = len(net.names) - 1
    names = [layer for layer in _layers(net, layers, func) if net.position(layer) != last]
    if not names:
        raise ParameterError(
            f"{func} needs at least one layer before the output '{net.names[last]}'; the output is always included. "
            f"Layers: {format_choices([INPUT_LAYER] + net.names[:-1])}."
        )
    positions = [net.position(layer) for layer in names] + [last]
    acts = _collect(net, x, set(positions), batch_size, func)
    node_names = names + [net.names[last]]

    # output layer: eigenbasis of the logits' Gram
    logits = acts[last].reshape(n, -1)
    d_out = logits.shape[1]
    ev, vec = _eigh_desc(logits.T @ logits / n)
    sign = _signs(logits @ vec)
    c_out = vec * sign
    width = {node_names[-1]: d_out}
    gram_ev = {node_names[-1]: ev.cpu().numpy()}
    inter_ev = {node_names[-1]: ev.cpu().numpy()}
    basis = {node_names[-1]: c_out.cpu().numpy()}
    f_hats = {node_names[-1]: logits @ c_out}
    sizes = {node_names[-1]: d_out}
    edges: dict[str, np.ndarray] = {}

    # batch sizes from the largest possible basis of the next layer (its width + 1), so the total is known
    folded_width = [acts[p][0].numel() + 1 for p in positions[:-1]] + [d_out]
    steps = [_chunk(batch_size, folded_width[i + 1], folded_width[i]) for i in range(len(names))]
    ticker = _Ticker(progress, 2 * sum(math.ceil(n / step) for step in steps))
    c_next, next_pos = c_out, last
    for i in reversed(range(len(names))):
        layer, next_name, p = node_names[i], node_names[i + 1], positions[i]
        f = acts[p]
        d = int(np.prod(f.shape[1:]))
        f_folded = torch.cat([f.reshape(n, d), torch.ones(n, 1, dtype=torch.float64, device=dev)], dim=1)
        dd, uu = _eigh_desc(f_folded.T @ f_folded / n)
        keep = dd > rtol * dd[0]
        u_r, d_r = uu[:, keep], dd[keep]
        tail = _folded(net.tail(p, next_pos))
        jacobians = _basis_jacobians(tail if next_pos == last else _with_constant(tail), f, c_next, steps[i])
        stored: list[tuple[int, torch.Tensor]] | None = (
            [] if n * c_next.shape[1] * (d + 1) * 8 <= 2 * _JACOBIAN_BYTES else None
        )
        m_folded = torch.zeros(d + 1, d + 1, dtype=torch.float64, device=dev)
        for s0, j in jacobians():
            if stored is not None:
                stored.append((s0, j))
            jj = j.reshape(-1, d + 1)
            m_folded += jj.T @ jj
            ticker.tick()
        m_folded /= n
        w = u_r * d_r.sqrt()  # U D^1/2: whitened -> folded coordinates
        lam, v = _eigh_desc(w.T @ m_folded @ w)
        kept = lam > rtol * lam[0] if lam[0] > 0 else torch.zeros_like(lam, dtype=torch.bool)
        if not bool(kept.any()):
            raise DataError(
                f"{func}: the output does not depend on layer '{layer}' on this dataset (its interaction basis is empty); "
                "pick layers the output depends on."
            )
        v_k, lam_k = v[:, kept], lam[kept]
        c = (u_r / d_r.sqrt()) @ v_k * lam_k.sqrt()  # C = U D^-1/2 V Λ^1/2
        inverse = w @ v_k / lam_k.sqrt()  # f' = inverse · f̂ on the kept directions
        sign = _signs(f_folded @ c)
        c, inverse = c * sign, inverse * sign
        f_hat = f_folded @ c
        # edges: E_ij = mean_s (J̃_s[i, j] f̂_s[j])², with J̃_s = J_s · inverse the Jacobian in basis coordinates
        e = torch.zeros(c_next.shape[1], c.shape[1], dtype=torch.float64, device=dev)
        again = jacobians() if stored is None else iter(stored)
        for s0, j in again:
            e += ((j @ inverse * f_hat[s0 : s0 + j.shape[0], None, :]) ** 2).sum(0)
            ticker.tick()
        edges[f"{layer}->{next_name}"] = (e / n).cpu().numpy()
        width[layer] = d
        gram_ev[layer] = dd.cpu().numpy()
        inter_ev[layer] = lam.cpu().numpy()
        basis[layer] = c.cpu().numpy()
        f_hats[layer] = f_hat
        sizes[layer] = int(c.shape[1])
        c_next, next_pos = c, p

    pair_keys = [f"{a}->{b}" for a, b in zip(node_names[:-1], node_names[1:])]
    size_list = [sizes[layer] for layer in node_names]
    edge_list = [edges[k] for k in pair_keys]
    parts, modularity = _louvain(_graph(edge_list, size_list, graph_directions), seed)
    communities = {layer: np.full(sizes[layer], -1, dtype=np.int64) for layer in node_names}
    for label, part in enumerate(parts):
        for li, j in part:
            communities[node_names[li]][j] = label
    pair_mod = {}
    for i, key in enumerate(pair_keys):
        _, q = _louvain(_graph([edge_list[i]], size_list[i : i + 2], graph_directions), seed)
        pair_mod[key] = q
    order = {layer: i for i, layer in enumerate(node_names)}
    srt = lambda dct: dict(sorted(dct.items(), key=lambda kv: order[kv[0]]))  # noqa: E731
    return InteractionBasisResult(
        layers=tuple(node_names),
        width=srt(width),
        basis_size=srt(sizes),
        gram_eigenvalues=srt(gram_ev),
        interaction_eigenvalues=srt(inter_ev),
        basis=srt(basis),
        activations=srt({k: v.cpu().numpy() for k, v in f_hats.items()}),
        edges={k: edges[k] for k in pair_keys},
        communities=communities,
        modularity=modularity,
        pair_modularity=pair_mod,
        rtol=rtol,
        graph_directions=graph_directions,
        model=net.name,
        n_samples=n,
        params={"rtol": rtol, "graph_directions": graph_directions, "batch_size": batch_size},
        seed=seed,
        device=str(dev),
        seconds=time.perf_counter() - start_time,
    )


# ---------------------------------------------------------------------------------------------
# public: local learning coefficient (optional, hyper-parameter sensitive)


LLC_DRIFT_TOLERANCE = 0.1  # a trace whose second half after burn-in moved more than this share of the excess loss


@dataclass(frozen=True, kw_only=True)
class LLCResult(RecordedResult):
    """A local learning coefficient estimate by SGLD. **Sensitive to its hyper-parameters**: report them with it.

    ``llc``: mean over chains of ``nβ · (mean_t L_t - L(w*))``, where ``L_t`` is the loss on the
    step's minibatch after burn-in and ``L(w*)`` the loss of the trained weights on the whole
    dataset; ``llc_per_chain``: one estimate per chain; ``llc_std``: their standard deviation (it
    measures chain noise, not the bias from the hyper-parameters). For a regular model with ``d``
    identifiable parameters at a minimum the coefficient is ``d / 2``; degeneracy lowers it.
    ``loss_trace``: ``(n_chains, n_steps)`` minibatch losses; ``loss_init``: ``L(w*)``.
    ``step_size``, ``localization`` (γ), ``n_beta`` (the inverse temperature times n),
    ``n_steps``, ``n_burnin``, ``batch_size`` are the hyper-parameters the number depends on.
    ``drift``: how far the chains still moved after burn-in: the mean loss of the second half of the kept steps
    minus that of the first half, as a fraction of the mean excess loss ``mean_t L_t - L(w*)`` the estimate is
    made of, averaged over chains; ``drift_se``: its standard error over the chains (0 for one chain).
    :attr:`settled` unless the drift is both above ``LLC_DRIFT_TOLERANCE`` and more than twice its standard error
    (a trace that still drifts has not reached its stationary mean, and the estimate would move with more steps).
    """

    llc: float
    llc_std: float
    llc_per_chain: np.ndarray
    loss_init: float
    loss_trace: np.ndarray
    step_size: float
    localization: float
    n_beta: float
    n_chains: int
    n_steps: int
    n_burnin: int
    batch_size: int
    n_parameters: int
    model: str
    drift: float = 0.0
    drift_se: float = 0.0
    estimator: str = "local learning coefficient by SGLD (Lau et al. 2023); hyper-parameter sensitive"
    seed: int | None = 0
    dtype: str = "float64"

    @property
    def settled(self) -> bool:
        """Whether the loss trace is flat after burn-in: its drift within ``LLC_DRIFT_TOLERANCE`` of the excess loss,
        or within twice its standard error over the chains (the chains' own noise)."""
        return abs(self.drift) <= max(LLC_DRIFT_TOLERANCE, 2.0 * self.drift_se)

    def hyperparameters(self) -> str:
        """The hyper-parameters in one line, to show next to the number."""
        return (
            f"step size {self.step_size:g}, localization γ {self.localization:g}, nβ {self.n_beta:.4g}, "
            f"{self.n_chains} chains × {self.n_steps} steps ({self.n_burnin} burn-in), batch {self.batch_size}"
        )


def llc_estimate(
    model: Any,
    dataset: Any,
    *,
    step_size: float = 1e-4,
    localization: float = 100.0,
    n_beta: float | None = None,
    n_chains: int = 4,
    n_steps: int = 300,
    n_burnin: int = 100,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress = None,
) -> LLCResult:
    """The local learning coefficient (LLC) of a trained classifier at its weights, estimated by SGLD.

    The LLC ``λ`` measures how the volume of near-optimal weights shrinks around ``w*`` (Lau et al.
    2023, "Quantifying degeneracy in singular models via the learning coefficient"): ``d / 2`` for a
    regular model with ``d`` parameters, less for a degenerate one. The estimate samples the tempered,
    localised posterior ``p(w) ∝ exp(-nβ L(w) - γ/2 |w - w*|²)`` with stochastic-gradient Langevin
    dynamics, ``w ← w - ε/2 (nβ ∇L_batch(w) + γ (w - w*)) + N(0, ε)``, and returns
    ``λ̂ = nβ (E[L] - L(w*))`` with ``L`` the mean cross-entropy. Chains run in parallel (vmapped).

    The number depends on every hyper-parameter (a too large step diverges or overestimates, a too
    large γ pins the chain and underestimates, too few steps have not mixed); compare estimates only
    at equal settings, check that ``loss_trace`` is flat after burn-in, and show
    :meth:`LLCResult.hyperparameters` next to the number. Chains that diverge (a loss that becomes NaN
    or infinite, or an estimate above the number of parameters, twice the largest possible
    coefficient) raise a :class:`~workbench.errors.ParameterError` instead of returning a number.

    model: a LoadedModel or ``torch.nn.Module`` classifier (any architecture).
    dataset: a Dataset with integer class labels.
    step_size: SGLD step ε (> 0); typical 1e-5 to 1e-3.
    localization: γ (>= 0), the strength of the pull back to ``w*``; typical 1 to 1000.
    n_beta: inverse temperature times the number of samples; None for ``n / log n``.
    n_chains: independent chains (1-64); n_steps: steps per chain (10-100000); n_burnin: steps
        discarded at the start of each chain (0 to n_steps - 1).
    batch_size: samples per SGLD step (the whole dataset for exact gradients).
    seed: seed of the minibatches and the Langevin noise.
    device: where to compute (None: cuda > mps > cpu).
    progress: optional callable ``(done, total)`` called after each step.
    """
    func = "llc_estimate"
    step_size = check_float(step_size, "step_size", func=func, low=0.0, high=1.0, low_inclusive=False)
    localization = check_float(localization, "localization", func=func, low=0.0)
    n_chains = check_int(n_chains, "n_chains", func=func, low=1, high=64)
    n_steps = check_int(n_steps, "n_steps", func=func, low=10, high=100_000)
    n_burnin = check_int(n_burnin, "n_burnin", func=func, low=0, high=n_steps - 1)
    batch_size = check_int(batch_size, "batch_size", func=func, low=1, high=1 << 16)
    seed = check_seed(seed, func=func)
    start_time = time.perf_counter()
    dev = float64_device(resolve_device(device))
    module = model.module if hasattr(model, "module") else model
    if not isinstance(module, nn.Module):
        raise ParameterError(
            f"{func} needs a model (a LoadedModel from load_model, or a torch.nn.Module). Got {type(model).__name__}."
        )
    x = _inputs(dataset, func, dev, model)
    n = int(x.shape[0])
    y = _labels(dataset, n, func, dev, has_output=False)
    if n_beta is None:
        n_beta = n / math.log(n)
    n_beta = check_float(n_beta, "n_beta", func=func, low=0.0, low_inclusive=False)
    work = private_copy(module).eval()
    _without_inplace(work)
    # The chains run in the model's own precision (float64 convolutions on a CPU are several times slower, and
    # the Langevin noise is far larger than float32 rounding); L(w*) is taken the same way, so that the
    # difference nβ (E[L] - L(w*)) compares like with like, and the trace is accumulated in float64.
    dtype = torch.float64 if next((p.dtype for p in work.parameters()), torch.float32) == torch.float64 else torch.float32
    work = work.to(device=dev, dtype=torch.float64)
    _labels(dataset, n, func, dev, work, x, has_output=False)  # the labels must be classes of the model
    work = work.to(dtype=dtype)
    x = x.to(dtype)
    w_star = {k: v.detach() for k, v in work.named_parameters()}
    buffers = {k: v.detach() for k, v in work.named_buffers()}
    n_params = int(sum(v.numel() for v in w_star.values()))

    def loss(params: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(work, (params, buffers), (xb,)), yb)

    with torch.no_grad():
        try:
            loss_init = float(loss(w_star, x, y))
        except RuntimeError as exc:
            raise DataError(
                f"{func}: the model could not run on the dataset ({str(exc).splitlines()[0]}); check that the dataset "
                "matches the model's input and its labels the model's classes."
            ) from exc
    step = vmap(torch.func.grad_and_value(loss))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    chains = {k: v.expand(n_chains, *v.shape).clone() for k, v in w_star.items()}
    batch = min(batch_size, n)
    trace = torch.zeros(n_chains, n_steps, dtype=torch.float64)
    ticker = _Ticker(progress, n_steps)
    for t in range(n_steps):
        idx = torch.stack([torch.randperm(n, generator=gen)[:batch] for _ in range(n_chains)]).to(dev)
        grads, values = step(chains, x[idx], y[idx])
        trace[:, t] = values.detach().cpu()
        for k, w in chains.items():
            noise = torch.randn(w.shape, generator=gen, dtype=torch.float64).to(device=dev, dtype=dtype)
            drift = n_beta * grads[k] + localization * (w - w_star[k])
            chains[k] = w - 0.5 * step_size * drift + math.sqrt(step_size) * noise
        ticker.tick()
    if not bool(torch.isfinite(trace).all()):
        raise ParameterError(
            f"{func}: the SGLD chains diverged (the loss became NaN or infinite) with step_size={step_size:g}; "
            "use a smaller step_size or a larger localization."
        )
    per_chain = n_beta * (trace[:, n_burnin:].mean(1) - loss_init)
    if float(per_chain.max()) > n_params:
        raise ParameterError(
            f"{func}: the SGLD chains diverged (a chain's estimate {float(per_chain.max()):.3g} exceeds the "
            f"{n_params} parameters, while the coefficient is at most half of them) with step_size={step_size:g} "
            f"and localization={localization:g}; use a smaller step_size or a larger localization."
        )
    kept = trace[:, n_burnin:]
    half = kept.shape[1] // 2
    excess = float(kept.mean()) - loss_init
    trends = kept[:, half:].mean(1) - kept[:, :half].mean(1) if half else torch.zeros(n_chains, dtype=torch.float64)
    spread = float(trends.std()) / math.sqrt(n_chains) if n_chains > 1 else 0.0
    drift, drift_se = (float(trends.mean()) / excess, spread / excess) if excess > 0 else (0.0, 0.0)
    return LLCResult(
        llc=float(per_chain.mean()),
        drift=drift,
        drift_se=drift_se,
        llc_std=float(per_chain.std(correction=0)),
        llc_per_chain=per_chain.numpy(),
        loss_init=loss_init,
        loss_trace=trace.numpy(),
        step_size=step_size,
        localization=localization,
        n_beta=float(n_beta),
        n_chains=n_chains,
        n_steps=n_steps,
        n_burnin=n_burnin,
        batch_size=batch,
        n_parameters=n_params,
        model=str(getattr(model, "name", type(module).__name__)),
        n_samples=n,
        params={
            "step_size": step_size,
            "localization": localization,
            "n_beta": float(n_beta),
            "n_chains": n_chains,
            "n_steps": n_steps,
            "n_burnin": n_burnin,
            "batch_size": batch,
            "dtype": str(dtype).removeprefix("torch."),
        },
        seed=seed,
        device=str(dev),
        dtype=str(dtype).removeprefix("torch."),
        seconds=time.perf_counter() - start_time,
    )
