"""Forward hooks that capture layer outputs and pool them to ``(batch, features)``.

:func:`pool` is the pooling rule; :class:`PooledCapture` applies it to the outputs of the
requested layers during a forward pass. A conv map is large (a 32-channel 8x8 map is as many
numbers as the model's own BatchNorm reads), so ``PooledCapture`` avoids reading a map where the
pooled value follows from a smaller tensor, with the same result up to float rounding:

- a map that a plain ``nn.Sequential`` hands straight to a global pool of the same rule
  (``AdaptiveAvgPool2d(1)`` for ``mean``, ``AdaptiveMaxPool2d(1)`` for ``max``) is pooled by the
  model itself: its output is taken;
- the spatial mean of an eval-mode BatchNorm is its per-channel affine map of the mean of its
  input, when that input is a hooked layer's output (a conv followed by BatchNorm).

Both rely on the ``nn.Sequential`` handing one child's output to the next: they are taken only while
the container's own ``forward`` runs (not when a model calls its children itself, where it could change
the map in between) and where no hook or pre-hook but ours sits on the modules involved.

A convolution's spatial mean is also linear in its input, but taking it from the input costs
``in_channels x input positions`` multiply-adds per output channel, which is no fewer than the output's
own numbers for any usual layer (a first 3x3 convolution of a one-channel image is as many), and it needs
float64 to be as accurate as reading the float32 output: on the sample CNN it cost twice as much as
reading the map. So convolutions are pooled from their output.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from workbench.device import own_memory
from workbench.errors import DataError, ParameterError

POOLINGS = ("mean", "flatten", "max", "cls", "last")
_GLOBAL_POOLS: dict[str, tuple[type[nn.Module], ...]] = {
    "mean": (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d),
    "max": (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d),
}


def valid_layers(module: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in module.named_modules() if name}


def first_tensor(out: Any) -> torch.Tensor | None:
    """The first tensor in a module output (a tensor, or nested tuples, lists and dicts of them)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "values"):
        for v in out.values():
            t = first_tensor(v)
            if t is not None:
                return t
    if isinstance(out, (tuple, list)):
        for v in out:
            t = first_tensor(v)
            if t is not None:
                return t
    return None


@contextmanager
def hooks_on(module: nn.Module, layers: list[str], fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Register forward hooks on ``layers`` calling ``fn(name, output_tensor)``; always removed."""
    modules = valid_layers(module)
    handles = []
    try:
        for name in layers:
            def hook(_m: nn.Module, _inp: Any, out: Any, _name: str = name) -> None:
                t = first_tensor(out)
                if t is not None:
                    fn(_name, t)

            handles.append(modules[name].register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


_MODULE_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_MODULE_LOCKS_GUARD = threading.Lock()


def module_lock(module: nn.Module) -> threading.RLock:
    """The lock that forward passes observed by hooks on ``module`` hold: hooks registered on a module see
    every thread's forward passes, so hooked runs of one module take turns (re-entrant within a thread)."""
    with _MODULE_LOCKS_GUARD:
        lock = _MODULE_LOCKS.get(module)
        if lock is None:
            lock = _MODULE_LOCKS[module] = threading.RLock()
        return lock


@contextmanager
def exclusive(module: nn.Module) -> Iterator[nn.Module]:
    """Hold the :func:`module_lock` of ``module`` and of each of its submodules for the duration: for a hooked run,
    or for a forward pass or copy that must not meet another thread's hooks (a copy would take them along). A
    thread hooking the whole model and one hooking a part of it take turns. The locks are taken in one global
    order, so threads holding overlapping trees wait for each other instead of deadlocking."""
    with ExitStack() as stack:
        for m in sorted(module.modules(), key=id):
            stack.enter_context(module_lock(m))
        yield module


def private_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module``, taken while no other thread's extraction hooks are on it (a copy keeps the
    hooks it finds, which would then record the copy's forward passes into the other thread's results)."""
    with exclusive(module):
        return copy.deepcopy(module)


_CHANNEL_FIRST_1D = (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d, nn.InstanceNorm1d, nn.MaxPool1d, nn.AvgPool1d,
                     nn.AdaptiveMaxPool1d, nn.AdaptiveAvgPool1d)
_ATTENTION = (nn.MultiheadAttention, nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder,
              nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_SAME_LAYOUT = (nn.Dropout, nn.Dropout1d, nn.AlphaDropout, nn.Identity, nn.LayerNorm, nn.ReLU, nn.ReLU6, nn.LeakyReLU,
                nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh,
                nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink)


def _attention(m: nn.Module) -> bool:
    return isinstance(m, _ATTENTION) or "Attention" in type(m).__name__


def channel_first_model(module: nn.Module) -> bool:
    """Whether 3-D outputs of ``module``'s layers are ``(batch, channels, length)`` maps rather than token
    sequences by default: the model has 1-D convolutions, norms or pools and no attention."""
    mods = list(module.modules())
    return any(isinstance(m, _CHANNEL_FIRST_1D) for m in mods) and not any(_attention(m) for m in mods)


def channel_first_layers(module: nn.Module, layers: list[str]) -> dict[str, bool]:
    """For each of ``layers``, whether its 3-D outputs are channel-first maps: an ``nn.Embedding`` gives a
    token sequence; a 1-D convolution, BatchNorm, InstanceNorm or pool gives a ``(batch, channels, length)``
    map; an activation, dropout or LayerNorm in a plain ``nn.Sequential`` keeps the layout of the child
    before it; any other layer follows :func:`channel_first_model`."""
    default = channel_first_model(module)
    modules = valid_layers(module)

    def layout(name: str) -> bool:
        m = modules[name]
        if isinstance(m, nn.Embedding):
            return False
        if isinstance(m, _CHANNEL_FIRST_1D):
            return True
        if isinstance(m, _SAME_LAYOUT):
            _, prev, _ = _sequential_neighbours(module, name)
            if prev is not None:
                return layout(prev)
        return default

    return {name: layout(name) for name in layers}


def _is_spatial(out: torch.Tensor, channel_first: bool) -> bool:
    return out.ndim >= 4 or (out.ndim == 3 and channel_first)


def pool(out: torch.Tensor, rule: str, *, channel_first: bool, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pool one layer's batch output to ``(batch, features)``.

    2-D outputs are returned as they are. Conv maps ``(B, C, *spatial)`` (4-D and 5-D outputs, and
    3-D ones when ``channel_first``, see :func:`channel_first_layers`) are channel-first: ``mean``/``max`` reduce the
    spatial axes, ``flatten`` keeps everything. Token sequences ``(B, T, D)``: ``mean``/``max``
    over tokens (padding excluded when a mask is given), ``cls`` the first token, ``last`` the last
    non-padding token; a sample that is all padding gives zeros under every rule.
    """
    if out.ndim == 0:
        raise DataError("A layer output of shape () is one scalar per batch, so it has no activations per sample; pick another layer.")
    if out.ndim == 1:
        return out.reshape(-1, 1)
    if out.ndim == 2:
        return out
    if rule == "flatten":
        return out.reshape(out.shape[0], -1)
    if _is_spatial(out, channel_first):
        if rule in ("cls", "last"):
            raise ParameterError(f"Pooling '{rule}' applies to token sequences; this layer outputs a conv map of shape {tuple(out.shape)}. Use 'mean', 'max' or 'flatten'.")
        dims = tuple(range(2, out.ndim))  # reduced in place, whatever the memory format (no reshape copy)
        return out.mean(dims, dtype=_mean_dtype(out)) if rule == "mean" else out.amax(dims)
    if out.ndim > 3:
        out = out.reshape(out.shape[0], out.shape[1], -1)
    if mask is None or mask.shape != out.shape[:2]:
        if rule == "cls":
            return out[:, 0]
        if rule == "last":
            return out[:, -1]
        return out.mean(1, dtype=_mean_dtype(out)) if rule == "mean" else out.amax(1)
    mask = mask.to(device=out.device, dtype=torch.bool)
    present = mask.any(1, keepdim=True)  # samples with at least one non-padding token
    if rule == "cls":
        return out[:, 0].masked_fill(~present, 0)
    if rule == "last":
        positions = torch.arange(out.shape[1], device=out.device).expand_as(mask)
        idx = torch.where(mask, positions, -1).amax(1).clamp(min=0)
        return out[torch.arange(out.shape[0], device=out.device), idx].masked_fill(~present, 0)
    if rule == "mean":
        dtype = _mean_dtype(out) or out.dtype
        return out.masked_fill(~mask.unsqueeze(-1), 0).sum(1, dtype=dtype) / mask.sum(1, keepdim=True).clamp(min=1).to(dtype)
    return out.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1).masked_fill(~present, 0)


def _mean_dtype(out: torch.Tensor) -> torch.dtype | None:
    """float32 for the mean of a half-precision output (its own precision would round the mean to 3 digits)."""
    return torch.float32 if out.dtype in (torch.float16, torch.bfloat16) else None


def _global_forward_hooks() -> bool:
    """Whether hooks or pre-hooks registered for every module (``register_module_forward_hook``,
    ``register_module_forward_pre_hook``) could change inputs or outputs."""
    from torch.nn.modules import module as module_impl

    return any(getattr(module_impl, attr, None) for attr in ("_global_forward_hooks", "_global_forward_pre_hooks"))


def _state(*tensors: torch.Tensor | None) -> tuple | None:
    """The tensors (kept, so that their ids are not reused) with their in-place version counts: equal states mean
    unchanged values. None when a tensor was made under ``torch.inference_mode`` and counts no changes."""
    try:
        return tuple((t, t._version) if t is not None else (None, 0) for t in tensors)
    except RuntimeError:
        return None


def _same_state(a: tuple, b: tuple) -> bool:
    return all(x[0] is y[0] and x[1] == y[1] for x, y in zip(a, b, strict=True))


def _stock_forward(module: nn.Module, base: type[nn.Module]) -> bool:
    """Whether ``module`` (an instance of ``base``) runs ``base``'s own forward: neither a subclass nor the instance
    itself replaces it."""
    return type(module).forward is base.forward and "forward" not in vars(module)


def _global_pool(module: nn.Module, rule: str) -> bool:
    base = next((c for c in _GLOBAL_POOLS.get(rule, ()) if isinstance(module, c)), None)
    if base is None or not _stock_forward(module, base) or getattr(module, "return_indices", False):
        return False
    size = module.output_size
    sizes = size if isinstance(size, tuple) else (size,)
    return all(s == 1 for s in sizes)


def _sequential_neighbours(root: nn.Module, name: str) -> tuple[nn.Module | None, str | None, nn.Module | None]:
    """The plain ``nn.Sequential`` that holds ``name``, the path of the module it calls right before ``name`` and
    the module it calls right after (its previous and next children); ``(None, None, None)`` outside such a
    container."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if not isinstance(parent, nn.Sequential) or not _stock_forward(parent, nn.Sequential):
        return None, None, None
    names = [k for k, v in parent._modules.items() if v is not None]
    i = names.index(child)
    prefix = f"{parent_name}." if parent_name else ""
    prev = prefix + names[i - 1] if i > 0 else None
    return parent, prev, parent._modules[names[i + 1]] if i + 1 < len(names) else None


def _eval_batchnorm(module: nn.Module) -> bool:
    """A stock BatchNorm in eval mode with running statistics: a fixed affine map per channel."""
    bn = nn.modules.batchnorm._BatchNorm
    return (isinstance(module, bn) and _stock_forward(module, bn) and not module.training
            and module.track_running_stats and module.running_mean is not None and module.running_var is not None)


def _batchnorm_affine(bn: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``bn(x) = x * scale + shift`` per channel (built in float64)."""
    scale = 1 / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -bn.running_mean.detach().double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale.to(dtype), shift.to(dtype)


class PooledCapture:
    """Forward hooks on ``layers`` that leave each layer's pooled batch output in :attr:`pooled`.

    Use as a context manager (hooks are removed on exit, also after an error); call
    :meth:`begin_batch` before and :meth:`end_batch` after each forward pass. ``mask`` (set per
    batch) marks the non-padding tokens of token-sequence models. ``channel_first`` says whether 3-D
    outputs are ``(batch, channels, length)`` maps, for all layers or per layer (a mapping from layer
    name, as :func:`channel_first_layers` gives). :attr:`sources` says how each
    pooled value of the last batch was obtained: ``"map"`` (the layer's output was read),
    ``"global pool"`` (the following pool's output) or ``"affine"`` (an eval-mode BatchNorm's mean
    from the mean of its hooked input).
    """

    def __init__(self, module: nn.Module, layers: list[str], rule: str, *, channel_first: bool | Mapping[str, bool]):
        self.module, self.layers, self.rule = module, list(layers), rule
        self.channel_first = ({name: bool(channel_first[name]) for name in self.layers} if isinstance(channel_first, Mapping)
                              else dict.fromkeys(self.layers, bool(channel_first)))
        self.mask: torch.Tensor | None = None
        self.pooled: dict[str, torch.Tensor] = {}
        self.sources: dict[str, str] = {}
        self._exact: dict[str, torch.Tensor] = {}  # pooled values before the float32 cast, for a BatchNorm after them
        self._pending: dict[str, torch.Tensor] = {}  # maps waiting for the global pool that follows them
        self._outputs: dict[str, torch.Tensor] = {}  # outputs a following BatchNorm's hook checks its input against
        self._keep_output: set[str] = set()
        self._parents: dict[str, nn.Module] = {}  # the nn.Sequential whose own forward a route relies on
        self._running: dict[int, int] = {}  # how deep each such container's forward is running now
        self._plans: dict[str, tuple[tuple, Any]] = {}
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> PooledCapture:
        try:
            modules = valid_layers(self.module)
            hooked = ({id(m) for m in self.module.modules() if m._forward_hooks or m._forward_pre_hooks}
                      if not _global_forward_hooks() else None)

            def untouched(m: nn.Module) -> bool:  # no hook or pre-hook but ours could change its input or output
                return hooked is not None and id(m) not in hooked

            for name in self.layers:
                target = modules[name]
                parent, prev, nxt = _sequential_neighbours(self.module, name)
                if nxt is not None and _global_pool(nxt, self.rule) and untouched(nxt):
                    self._watch(name, parent)
                    self._handles.append(target.register_forward_hook(self._deferring_hook(name)))
                    self._handles.append(nxt.register_forward_hook(self._global_pool_hook(name)))
                    continue
                route = "map"
                if self.rule == "mean" and untouched(target):
                    if _eval_batchnorm(target) and prev in self.layers:
                        route = "affine"
                        self._keep_output.add(prev)
                        self._watch(name, parent)
                self._handles.append(target.register_forward_hook(self._hook(name, route, prev)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._pending.clear()
        self._outputs.clear()
        self._exact.clear()

    def _watch(self, name: str, parent: nn.Module | None) -> None:
        """Count the runs of ``parent``'s own forward, during which it hands each child's output to the next."""
        if parent is None:
            return
        self._parents[name] = parent
        key = id(parent)
        if key in self._running:
            return
        self._running[key] = 0

        def enter(_m: nn.Module, _inp: Any) -> None:
            self._running[key] += 1

        def leave(_m: nn.Module, _inp: Any, _out: Any) -> None:
            self._running[key] = max(self._running[key] - 1, 0)

        self._handles.append(parent.register_forward_pre_hook(enter))
        self._handles.append(parent.register_forward_hook(leave, always_call=True))

    def _wired(self, name: str) -> bool:
        """Whether the container a route of ``name`` relies on is running its own forward now."""
        parent = self._parents.get(name)
        return parent is not None and self._running.get(id(parent), 0) > 0

    def begin_batch(self, mask: torch.Tensor | None = None) -> None:
        self.mask = mask
        self.pooled.clear()
        self.sources.clear()
        self._exact.clear()
        self._pending.clear()
        self._outputs.clear()
        for key in self._running:
            self._running[key] = 0

    def end_batch(self) -> dict[str, torch.Tensor]:
        """The pooled outputs of this batch; a map whose global pool did not run is pooled here."""
        for name, out in self._pending.items():
            self._set(name, self._pool(out, name), "map")
        self._pending.clear()
        self._outputs.clear()
        return self.pooled

    def _pool(self, out: torch.Tensor, name: str) -> torch.Tensor:
        """``out`` pooled into memory of its own: a 2-D output, a flattened map or a token taken by ``cls``
        or ``last`` would otherwise be a view of the output, and a later in-place operation of the model
        (``nn.ReLU(inplace=True)`` after a linear layer) would change it before it is written."""
        if out.ndim == 0:
            raise DataError(f"Layer '{name}' outputs one scalar per batch, so it has no activations per sample; pick another layer.")
        try:
            pooled = pool(out.detach(), self.rule, channel_first=self.channel_first[name], mask=self.mask)
        except ParameterError as exc:  # name the layer and give its shape per sample, not per batch
            raise ParameterError(
                f"Pooling '{self.rule}' applies to token sequences; layer '{name}' outputs conv maps of shape "
                f"{tuple(out.shape[1:])} per sample. Use 'mean', 'max' or 'flatten'."
            ) from exc
        return own_memory(pooled, out)

    def _set(self, name: str, value: torch.Tensor, source: str) -> None:
        self._exact[name] = value
        self.pooled[name] = value.float()
        self.sources[name] = source

    def _hook(self, name: str, route: str, prev: str | None) -> Callable[..., None]:
        def hook(module: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
            t = first_tensor(out)
            if t is None:
                return
            if name in self._keep_output:
                self._outputs[name] = t
            x = inp[0] if inp and isinstance(inp[0], torch.Tensor) else None
            prev_out = self._outputs.pop(prev, None) if route == "affine" else None  # held no longer than needed
            if route == "map" or x is None or not _is_spatial(t, self.channel_first[name]) or x.dtype != t.dtype:
                self._set(name, self._pool(t, name), "map")
            elif (route == "affine" and x is prev_out and prev in self._exact and x.shape == t.shape and self._wired(name)
                    and self.channel_first[prev] == self.channel_first[name] and _is_spatial(x, self.channel_first[prev])
                    and (plan := self._affine_plan(name, module, self._exact[prev].dtype)) is not None):
                scale, shift = plan
                self._set(name, torch.addcmul(shift, self._exact[prev], scale), "affine")
            else:
                self._set(name, self._pool(t, name), "map")

        return hook

    def _plan(self, name: str, key: tuple, state: tuple | None, build: Callable[[], Any]) -> Any:
        """The plan of ``name`` for ``key``, rebuilt when the tensors it was built from (``state``) changed; None
        (read the map) when their changes are not counted."""
        if state is None:
            return None
        held = self._plans.get(name)
        if held is None or held[0][0] != key or not _same_state(held[0][1], state):
            held = self._plans[name] = ((key, state), build())
        return held[1]

    def _affine_plan(self, name: str, bn: nn.Module, dtype: torch.dtype) -> Any:
        return self._plan(name, (dtype,), _state(bn.running_mean, bn.running_var, bn.weight, bn.bias),
                          lambda: _batchnorm_affine(bn, dtype))

    def _deferring_hook(self, name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inp: tuple[Any, ...], out: Any) -> None:
            t = first_tensor(out)
            if t is None:
                return
            if name in self._keep_output:
                self._outputs[name] = t
            if self._wired(name):
                self._pending[name] = t  # the container hands it to the pool next, unchanged
            else:  # called by a model's own code, which could change the map before or after the pool reads it
                self._set(name, self._pool(t, name), "map")

        return hook

    def _global_pool_hook(self, name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
            pending = self._pending.pop(name, None)
            if pending is None:
                return
            if (inp and inp[0] is pending and isinstance(out, torch.Tensor) and self._wired(name)
                    and _is_spatial(pending, self.channel_first[name]) and out.shape[:2] == pending.shape[:2]):
                self._set(name, out.detach().reshape(out.shape[0], -1).clone(), "global pool")
            else:  # pooled now, before later modules could change it
                self._set(name, self._pool(pending, name), "map")

        return hook
