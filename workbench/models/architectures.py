"""Architecture registry: a JSON-able spec -> an ``nn.Module``.

A state dict carries weights but no code. A spec such as
``{"type": "mlp", "sizes": [64, 512, 512, 10], "activation": "relu"}`` names a known architecture so
that such weights can be loaded without running any uploaded code. Layer names are stable and
readable (``fc1``, ``relu1``, ``out``), because they are what users pick in the layer tree.

Supported types:

``mlp``
    ``sizes`` [in, h1, ..., out] (at least 2), ``activation`` relu | tanh | gelu | sigmoid,
    optional ``batchnorm`` (bool). Layers: ``fc1, bn1?, relu1, fc2, ..., out``.
``cnn``
    ``input_shape`` [C, H, W], ``channels`` list, ``kernel_size`` (default 3), ``batchnorm`` (bool,
    default true), ``hidden`` width of the dense layer (0 for none), ``n_classes``. Inputs may be
    flat ``(n, C*H*W)``; the first module ``unflatten`` reshapes them. Layers: ``conv1, bn1, relu1,
    conv2, ..., pool, fc1, relu_fc1, out``.
``resmlp``
    A residual MLP: ``in_features``, ``width``, ``n_blocks``, ``n_classes``, ``activation``.
    ``h = inp(x); h = h + blockK.fc2(act(blockK.fc1(h)))``; ``out(h)``. The residual stream shares
    one permutation across blocks.
``transformer``
    A small text encoder over byte tokens: ``vocab_size``, ``max_len``, ``d_model``, ``n_heads``,
    ``n_layers``, ``n_classes``. Input: ``(n, max_len)`` int64 token ids, 0 = padding;
    the classifier reads the first (CLS) token.
``torch.nn``
    Any tree of ``nn.Sequential`` containers over stock ``torch.nn`` layers (linear, conv,
    normalisation, activation, pooling, reshaping, dropout, embedding; see ``TORCH_NN_LAYERS``):
    ``root`` is ``{"class": "Sequential", "children": [[name, node], ...]}`` and each leaf node is
    ``{"class": "Conv2d", "args": {...}}`` with the layer's constructor arguments. Optional
    ``input_shape``. :func:`describe_module` writes such a spec for a module built that way.

A spec may come from an uploaded file, so its size is bounded before anything is allocated: at most
``MAX_SPEC_LAYERS`` repeated layers (entries of ``sizes`` or ``channels``, blocks, encoder layers,
``torch.nn`` nodes), containers nested at most ``MAX_SPEC_DEPTH`` deep, and at most ``MAX_PARAMETERS``
weights (parameters and buffers), counted by :func:`count_weights` on the meta device. Every size in a spec (a
width, a channel count, a layer argument) is at most ``MAX_SIZE``; one input sample holds at most ``MAX_INPUT_VALUES``
values, and where the input shape is known, every layer's output for one sample is counted on the meta device and
held to ``MAX_ACTIVATION_VALUES`` values (a pooling ``output_size`` is bounded by it too).
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from workbench.errors import ArchitectureError, did_you_mean, format_choices

MAX_PARAMETERS = 1 << 30  # the 16-bit weights a 2 GiB file holds; 4 GiB once built in float32
MAX_SPEC_LAYERS = 1_000
MAX_SPEC_DEPTH = 100
MAX_SIZE = 1 << 24  # any one width, channel count, vocabulary or layer argument (real models stay below 2**20)
MAX_INPUT_VALUES = 1 << 24  # values in one input sample (64 MiB in float32; a 3x224x224 image has 150,528)
MAX_ACTIVATION_VALUES = 1 << 24  # values one layer outputs for one sample (64 MiB in float32)

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
}


def _get(spec: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if key not in spec:
        if default is ...:
            raise ArchitectureError(
                f"The '{spec.get('type')}' architecture spec needs a '{key}' entry; got keys {sorted(spec)}."
            )
        return default
    value = spec[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ArchitectureError(
            f"The '{key}' entry of the '{spec.get('type')}' architecture spec has the wrong type: got {value!r}."
        )
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _size(spec: dict[str, Any], key: str, default: Any = ..., minimum: int = 1) -> int:
    """An int entry of the spec in ``[minimum, MAX_SIZE]``."""
    value = _get(spec, key, int, default)
    if not minimum <= value <= MAX_SIZE:
        raise ArchitectureError(
            f"The '{key}' entry of the '{spec.get('type')}' spec must be an int in [{minimum}, {MAX_SIZE:,}]. Got {value}; check the spec."
        )
    return value


def _positive_ints(spec: dict[str, Any], key: str, min_len: int) -> list[int]:
    values = _get(spec, key, list)
    if len(values) > MAX_SPEC_LAYERS:
        raise ArchitectureError(
            f"The '{key}' entry of the '{spec.get('type')}' spec lists {len(values)} layers, more than the {MAX_SPEC_LAYERS} "
            "a spec may build; check the spec."
        )
    if len(values) < min_len or not all(_is_int(v) and 0 < v <= MAX_SIZE for v in values):
        raise ArchitectureError(
            f"The '{key}' entry of the '{spec.get('type')}' spec must be a list of at least {min_len} ints in [1, {MAX_SIZE:,}]. "
            f"Got {_short(values)}."
        )
    return values


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + " …"


def _input_shape(spec: dict[str, Any]) -> list[int]:
    """The spec's ``input_shape``: a non-empty list of positive ints whose product (one sample) is at most ``MAX_INPUT_VALUES``."""
    shape = spec.get("input_shape")
    if not isinstance(shape, list) or not shape or len(shape) > MAX_SPEC_DEPTH or not all(_is_int(v) and v > 0 for v in shape):
        raise ArchitectureError(
            f"The 'input_shape' entry of the '{spec.get('type')}' spec must be a non-empty list of positive ints (one sample's "
            f"shape, e.g. [3, 32, 32]). Got {_short(shape)}."
        )
    n_values = math.prod(shape)
    if n_values > MAX_INPUT_VALUES:
        raise ArchitectureError(
            f"The 'input_shape' entry of the '{spec.get('type')}' spec, {_short(shape)}, makes one sample of {n_values:,} values, "
            f"more than the {MAX_INPUT_VALUES:,} an input may have here; check the spec."
        )
    return shape


def _layer_count(spec: dict[str, Any], key: str) -> int:
    value = _get(spec, key, int)
    if not 0 <= value <= MAX_SPEC_LAYERS:
        raise ArchitectureError(
            f"The '{key}' entry of the '{spec.get('type')}' spec must be an int in [0, {MAX_SPEC_LAYERS}]. Got {value}."
        )
    return value


def _activation(spec: dict[str, Any]) -> tuple[str, Callable[[], nn.Module]]:
    name = _get(spec, "activation", str, "relu")
    if name not in _ACTIVATIONS:
        raise ArchitectureError(
            f"Unknown activation '{name}' in the architecture spec; supported: {format_choices(_ACTIVATIONS)}."
        )
    return name, _ACTIVATIONS[name]


def build_mlp(spec: dict[str, Any]) -> nn.Module:
    sizes = _positive_ints(spec, "sizes", 2)
    act_name, act = _activation(spec)
    batchnorm = _get(spec, "batchnorm", bool, False)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-2], sizes[1:-1]), start=1):
        layers[f"fc{i}"] = nn.Linear(fan_in, fan_out)
        if batchnorm:
            layers[f"bn{i}"] = nn.BatchNorm1d(fan_out)
        layers[f"{act_name}{i}"] = act()
    layers["out"] = nn.Linear(sizes[-2], sizes[-1])
    return nn.Sequential(layers)


def build_cnn(spec: dict[str, Any]) -> nn.Module:
    shape = _input_shape(spec)
    if len(shape) != 3:
        raise ArchitectureError(f"The 'input_shape' of a cnn spec must be [channels, height, width]. Got {shape!r}.")
    channels = _positive_ints(spec, "channels", 1)
    kernel = _size(spec, "kernel_size", 3)
    batchnorm = _get(spec, "batchnorm", bool, True)
    hidden = _size(spec, "hidden", 64, minimum=0)
    n_classes = _size(spec, "n_classes")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["unflatten"] = nn.Unflatten(1, tuple(shape))
    c_in = shape[0]
    for i, c_out in enumerate(channels, start=1):
        layers[f"conv{i}"] = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2)
        if batchnorm:
            layers[f"bn{i}"] = nn.BatchNorm2d(c_out)
        layers[f"relu{i}"] = nn.ReLU()
        c_in = c_out
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    if hidden:
        layers["fc1"] = nn.Linear(c_in, hidden)
        layers["relu_fc1"] = nn.ReLU()
        c_in = hidden
    layers["out"] = nn.Linear(c_in, n_classes)
    return nn.Sequential(layers)


class ResidualBlock(nn.Module):
    """``h + fc2(act(fc1(h)))``."""

    def __init__(self, width: int, hidden: int, act: Callable[[], nn.Module]):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = act()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(self.act(self.fc1(h)))


class ResMLP(nn.Module):
    """Residual MLP: ``out(blocks(inp(x)))``."""

    def __init__(self, in_features: int, width: int, n_blocks: int, n_classes: int, act: Callable[[], nn.Module]):
        super().__init__()
        self.inp = nn.Linear(in_features, width)
        self.blocks = nn.Sequential(*[ResidualBlock(width, width, act) for _ in range(n_blocks)])
        self.out = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.inp(x)))


def build_resmlp(spec: dict[str, Any]) -> nn.Module:
    _, act = _activation(spec)
    return ResMLP(
        _size(spec, "in_features"), _size(spec, "width"), _layer_count(spec, "n_blocks"),
        _size(spec, "n_classes"), act,
    )


class TextEncoder(nn.Module):
    """A small transformer classifier over byte tokens (0 = padding, first token = CLS)."""

    def __init__(self, vocab_size: int, max_len: int, d_model: int, n_heads: int, n_layers: int, n_classes: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(1, max_len, d_model))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, n_heads, 2 * d_model, dropout=0.0, batch_first=True)
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, n_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pad = tokens == 0
        h = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=pad)
        h = self.norm(h)
        return self.out(h[:, 0])


def build_transformer(spec: dict[str, Any]) -> nn.Module:
    return TextEncoder(
        _size(spec, "vocab_size"), _size(spec, "max_len"), _size(spec, "d_model"),
        _size(spec, "n_heads"), _layer_count(spec, "n_layers"), _size(spec, "n_classes"),
    )


TORCH_NN_LAYERS = frozenset({
    "Linear", "Bilinear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d",
    "InstanceNorm3d", "Embedding", "ReLU", "ReLU6", "LeakyReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish",
    "Tanh", "Sigmoid", "Hardtanh", "Hardswish", "Hardsigmoid", "Softplus", "Softmax", "LogSoftmax", "Identity",
    "Flatten", "Unflatten", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "MaxPool1d",
    "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d",
    "AdaptiveAvgPool3d", "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AdaptiveMaxPool3d",
})  # stock layers that keep every constructor argument as an attribute of the same name
_NOT_ARGS = {"self", "device", "dtype", "_weight", "_freeze"}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (tuple, list, torch.Size)):
        return [_jsonable(v) for v in value]
    raise TypeError(type(value).__name__)


def _describe(module: nn.Module, path: str) -> dict[str, Any]:
    cls = type(module)
    where = f"'{path}' ({cls.__module__}.{cls.__qualname__})" if path else f"the model ({cls.__module__}.{cls.__qualname__})"
    if cls is nn.Sequential:
        return {"class": "Sequential",
                "children": [[k, _describe(v, f"{path}.{k}" if path else k)] for k, v in module._modules.items() if v is not None]}
    if cls.__name__ not in TORCH_NN_LAYERS or getattr(nn, cls.__name__, None) is not cls:
        raise ArchitectureError(f"{where} is not a stock torch.nn layer, so its code would be needed to run it")
    args: dict[str, Any] = {}
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name in _NOT_ARGS or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        value = getattr(module, p.name, p.default)
        if p.name == "bias" and (value is None or isinstance(value, torch.Tensor)):
            value = value is not None
        try:
            args[p.name] = _jsonable(value)
        except TypeError:
            raise ArchitectureError(f"{where} has an argument '{p.name}' of type {type(value).__name__} that a spec cannot hold") from None
    return {"class": cls.__name__, "args": args}


def describe_module(module: nn.Module) -> dict[str, Any]:
    """The ``torch.nn`` spec of a module built from ``nn.Sequential`` and stock layers only.

    Raises :class:`ArchitectureError` naming the first module that is not such a layer. The spec
    rebuilds a module with the same structure, names and parameter shapes (checked here by
    ``repr`` and by loading the state dict)."""
    spec: dict[str, Any] = {"type": "torch.nn", "root": _describe(module, "")}
    first = next((m for m in module.modules() if not isinstance(m, nn.Sequential)), None)
    if isinstance(first, nn.Linear):
        spec["input_shape"] = [first.in_features]
    elif isinstance(first, nn.Unflatten) and first.dim in (1, -len(first.unflattened_size) - 1):
        spec["input_shape"] = [int(torch.Size(first.unflattened_size).numel())]
    rebuilt = build_model(spec)
    if _describe(rebuilt, "") != spec["root"] or [type(m) for m in rebuilt.modules()] != [type(m) for m in module.modules()]:
        raise ArchitectureError("the model could not be described exactly by stock torch.nn layers (rebuilt structure differs)")
    rebuilt.load_state_dict(module.state_dict(), strict=True)
    return spec


def _build_node(node: Any, path: str) -> nn.Module:
    if not isinstance(node, dict) or not isinstance(node.get("class"), str):
        raise ArchitectureError(f"The 'torch.nn' spec node at '{path or 'root'}' must be an object with a 'class' entry.")
    name = node["class"]
    allowed = {"class", "children"} if name == "Sequential" else {"class", "args"}
    for key in node:
        if key not in allowed:
            raise ArchitectureError(
                f"The 'torch.nn' spec node at '{path or 'root'}' has an unknown entry {str(key)[:80]!r}, which would be "
                f"ignored.{did_you_mean(key, allowed)} A {'Sequential' if name == 'Sequential' else 'layer'} node has "
                f"{' and '.join(repr(k) for k in sorted(allowed))}."
            )
    if name == "Sequential":
        children = node.get("children")
        if not isinstance(children, list) or not all(isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) for c in children):
            raise ArchitectureError(f"The 'torch.nn' spec node at '{path or 'root'}' needs 'children': a list of [name, node] pairs.")
        seen: set[str] = set()
        for child, _ in children:
            if not child or "." in child:
                raise ArchitectureError(f"The 'torch.nn' spec node at '{path or 'root'}' has a child named {child[:80]!r}; a layer name "
                                        "must be non-empty and contain no '.': rename it.")
            if child in seen:
                raise ArchitectureError(f"The 'torch.nn' spec node at '{path or 'root'}' has two children named {child[:80]!r}, "
                                        "so one layer would replace the other; give each child its own name.")
            seen.add(child)
        return nn.Sequential(OrderedDict((k, _build_node(v, f"{path}.{k}" if path else k)) for k, v in children))
    if name not in TORCH_NN_LAYERS:
        raise ArchitectureError(f"Layer class {name!r} at '{path}' is not one a 'torch.nn' spec may name; allowed: Sequential, {format_choices(sorted(TORCH_NN_LAYERS))}.")
    args = node.get("args", {})
    if not isinstance(args, dict):
        raise ArchitectureError(f"The 'args' of '{path}' in the 'torch.nn' spec must be an object.")
    if set(args) & _NOT_ARGS:
        raise ArchitectureError(f"The 'args' of '{path}' in the 'torch.nn' spec set {sorted(set(args) & _NOT_ARGS)}, which a spec may not set; remove them.")
    if name == "Embedding" and args.get("max_norm") is not None:
        raise ArchitectureError(f"The Embedding at '{path}' in the 'torch.nn' spec sets 'max_norm', which rescales its weights "
                                "in place on every forward pass, so analysing the model would change it; remove 'max_norm' "
                                "(renormalise the weights once before saving them).")
    for key, value in args.items():
        ints = [value] if _is_int(value) else [v for v in value if _is_int(v)] if isinstance(value, list) else []
        if any(abs(v) > MAX_SIZE for v in ints):
            raise ArchitectureError(f"The '{key}' argument of '{path}' in the 'torch.nn' spec is {_short(value)}, beyond the "
                                    f"{MAX_SIZE:,} any size in a spec may have; check the spec.")
        if key == "output_size" and name.startswith("Adaptive"):
            sizes = value if isinstance(value, list) else [value]
            n_out = math.prod(v for v in sizes if _is_int(v) and v > 0)
            if n_out > MAX_ACTIVATION_VALUES:
                raise ArchitectureError(f"The 'output_size' of '{path}' in the 'torch.nn' spec, {_short(value)}, makes {n_out:,} values "
                                        f"per channel, more than the {MAX_ACTIVATION_VALUES:,} a layer may output here; check the spec.")
    return getattr(nn, name)(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})


def _check_tree(root: dict[str, Any]) -> None:
    """Bound a 'torch.nn' spec's node count and nesting depth before it is built (iteratively: no recursion limit)."""
    stack, n_nodes = [(root, 0)], 0
    while stack:
        node, depth = stack.pop()
        n_nodes += 1
        if n_nodes > MAX_SPEC_LAYERS or depth > MAX_SPEC_DEPTH:
            what = f"more than {MAX_SPEC_LAYERS} nodes" if n_nodes > MAX_SPEC_LAYERS else f"containers nested more than {MAX_SPEC_DEPTH} deep"
            raise ArchitectureError(f"The 'torch.nn' spec has {what}, beyond what a spec may build; check the spec.")
        children = node.get("children") if isinstance(node, dict) else None
        if isinstance(children, list):
            stack.extend((c[1], depth + 1) for c in children if isinstance(c, list) and len(c) == 2)


def build_torch_nn(spec: dict[str, Any]) -> nn.Module:
    root = _get(spec, "root", dict)
    _check_tree(root)
    if spec.get("input_shape") is not None:
        _input_shape(spec)
    return _build_node(root, "")


SPEC_ENTRIES: dict[str, frozenset[str]] = {  # what each type reads; any other entry is a typo that would be ignored
    "mlp": frozenset({"sizes", "activation", "batchnorm"}),
    "cnn": frozenset({"input_shape", "channels", "kernel_size", "batchnorm", "hidden", "n_classes"}),
    "resmlp": frozenset({"in_features", "width", "n_blocks", "n_classes", "activation"}),
    "transformer": frozenset({"vocab_size", "max_len", "d_model", "n_heads", "n_layers", "n_classes"}),
    "torch.nn": frozenset({"root", "input_shape"}),
}

ARCHITECTURES: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "mlp": build_mlp,
    "cnn": build_cnn,
    "resmlp": build_resmlp,
    "transformer": build_transformer,
    "torch.nn": build_torch_nn,
}


def parse_spec(spec: dict[str, Any] | str) -> dict[str, Any]:
    """Accept a dict or its JSON text; check it names a known architecture type."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise ArchitectureError(f"The architecture spec is not valid JSON ({exc.msg} at position {exc.pos}).") from exc
        except RecursionError as exc:
            raise ArchitectureError("The architecture spec nests JSON too deeply to be read; a spec is a few levels deep: check it.") from exc
    if not isinstance(spec, dict):
        raise ArchitectureError(f"The architecture spec must be a JSON object. Got {type(spec).__name__}.")
    kind = spec.get("type")
    if kind not in ARCHITECTURES:
        raise ArchitectureError(
            f"Unknown architecture type {kind!r}; supported types: {format_choices(ARCHITECTURES)}."
        )
    entries = SPEC_ENTRIES[kind] | {"type"}
    for key in spec:
        if key not in entries:
            raise ArchitectureError(
                f"The '{kind}' architecture spec has an unknown entry {str(key)[:80]!r}, which would be ignored.{did_you_mean(key, entries)} "
                f"Its entries are: {format_choices(sorted(entries))}."
            )
    return spec


def _construct(spec: dict[str, Any]) -> nn.Module:
    try:
        return ARCHITECTURES[spec["type"]](spec)
    except (TypeError, ValueError, RuntimeError, AssertionError, OverflowError, IndexError, KeyError) as exc:
        if isinstance(exc, ArchitectureError):
            raise
        lines = str(exc).strip().splitlines()  # a torch error may carry a C++ stack trace after its first line
        reason = lines[0][:200].rstrip(".") if lines else type(exc).__name__
        raise ArchitectureError(f"The '{spec['type']}' architecture spec could not be built ({reason}); check its sizes and layer arguments.") from exc


class _MetaInitSkipped(torch.overrides.TorchFunctionMode):
    """Random initialisation of meta tensors is a no-op (they hold no values); skipping ``normal_`` there keeps torch from
    importing its compiler, about a second per process."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        if func in (torch.Tensor.normal_, torch.nn.init.normal_) and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)


def _on_meta(spec: dict[str, Any]) -> nn.Module:
    with torch.device("meta"), _MetaInitSkipped():
        return _construct(spec)


def _n_weights(module: nn.Module) -> int:
    return sum(t.numel() for t in (*module.parameters(), *module.buffers()))


def count_weights(spec: dict[str, Any] | str) -> int:
    """Values in the parameters and buffers of the module a spec describes, counted on the meta device:
    nothing is allocated, whatever sizes the spec declares."""
    return _n_weights(_on_meta(parse_spec(spec)))


def _check_activations(spec: dict[str, Any], module: nn.Module) -> None:
    """Run one sample of the spec's input shape through ``module`` on the meta device (nothing is allocated) and refuse
    a layer that would output more than ``MAX_ACTIVATION_VALUES`` values for it. Only ``cnn`` and ``torch.nn`` specs are
    run: the other types output at most a width. A spec whose layers do not fit its input is refused, naming torch's
    reason (an operation the meta device does not support leaves the shapes to be checked when the model runs)."""
    def refuse(name: str, out_shape: tuple[int, ...]) -> None:
        raise ArchitectureError(
            f"Layer '{name}' of the '{spec['type']}' architecture spec would output {math.prod(out_shape):,} values "
            f"({'x'.join(map(str, out_shape))}) for one input of shape {spec['input_shape']}, more than the "
            f"{MAX_ACTIVATION_VALUES:,} a layer may output here; use a smaller input_shape or layer sizes."
        )

    if spec["type"] == "cnn":  # the shapes follow from the spec (a meta run would import sympy: ~1 s and ~75 MB)
        h, w = spec["input_shape"][1:]
        for name, m in module.named_children():
            if isinstance(m, nn.Conv2d):  # stride 1: each side grows by 2 * padding - kernel + 1
                h, w = (n + 2 * pad - k + 1 for n, pad, k in zip((h, w), m.padding, m.kernel_size))
                if m.out_channels * h * w > MAX_ACTIVATION_VALUES:
                    refuse(name, (m.out_channels, h, w))
        return
    if spec["type"] != "torch.nn" or spec.get("input_shape") is None:
        return
    shape = tuple(spec["input_shape"])

    def check(name: str, m: nn.Module, args: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.numel() > MAX_ACTIVATION_VALUES:
            refuse(name, tuple(out.shape[1:]))

    handles = [m.register_forward_hook(functools.partial(check, name)) for name, m in module.named_modules() if name]
    dtype = torch.int64 if _first_layer(spec.get("root")) == "Embedding" else torch.float32
    try:
        with torch.no_grad():
            module(torch.zeros((1, *shape), dtype=dtype, device="meta"))
    except ArchitectureError:
        raise
    except NotImplementedError:  # an operation the meta device lacks: the shapes are checked when the model runs
        pass
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        lines = str(exc).strip().splitlines()
        reason = lines[0][:200].rstrip(".") if lines else type(exc).__name__
        raise ArchitectureError(f"The layers of the 'torch.nn' spec do not fit its input_shape {spec['input_shape']} ({reason}); "
                                "check the input_shape or the layer sizes.") from exc
    finally:
        for handle in handles:
            handle.remove()


def meta_model(spec: dict[str, Any] | str) -> nn.Module:
    """The module a spec describes on the meta device (shapes and dtypes, no values), in eval mode; refused with
    :class:`ArchitectureError` when it would hold more than ``MAX_PARAMETERS`` weights, or (where the input shape is
    known) when a layer would output more than ``MAX_ACTIVATION_VALUES`` values for one sample."""
    spec = parse_spec(spec)
    module = _on_meta(spec)
    n_weights = _n_weights(module)
    if n_weights > MAX_PARAMETERS:
        raise ArchitectureError(
            f"The '{spec['type']}' architecture spec describes {n_weights:,} weights, more than the {MAX_PARAMETERS:,} "
            "a model may have here; check the spec's sizes."
        )
    _check_activations(spec, module.eval())
    return module


def _first_layer(node: Any) -> str | None:
    """The class of the first layer a 'torch.nn' spec runs (through leading Sequential containers)."""
    for _ in range(MAX_SPEC_DEPTH + 1):
        if not isinstance(node, dict) or node.get("class") != "Sequential":
            return node.get("class") if isinstance(node, dict) else None
        children = node.get("children")
        if not isinstance(children, list) or not children or not isinstance(children[0], list) or len(children[0]) != 2:
            return None
        node = children[0][1]
    return None


def build_model(spec: dict[str, Any] | str) -> nn.Module:
    """Build the (untrained) module a spec describes, in eval mode.

    Refused with :class:`ArchitectureError`, before anything is allocated, when it would hold more than
    ``MAX_PARAMETERS`` weights (:func:`meta_model` counts them first)."""
    spec = parse_spec(spec)
    meta_model(spec)
    return _construct(spec).eval()


def input_spec(spec: dict[str, Any] | None) -> tuple[tuple[int, ...], torch.dtype] | None:
    """Per-sample input shape and dtype for a spec, or None when unknown."""
    if spec is None:
        return None
    kind = spec.get("type")
    if kind == "mlp":
        return (spec["sizes"][0],), torch.float32
    if kind == "cnn":
        c, h, w = spec["input_shape"]
        return (c * h * w,), torch.float32
    if kind == "resmlp":
        return (spec["in_features"],), torch.float32
    if kind == "transformer":
        return (spec["max_len"],), torch.int64
    if kind == "torch.nn" and spec.get("input_shape") is not None:
        return tuple(_input_shape(spec)), torch.int64 if _first_layer(spec.get("root")) == "Embedding" else torch.float32
    return None
