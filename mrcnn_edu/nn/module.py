"""Param and Module: the two pieces of the explicit-autograd toolkit.

A ``Param`` is an array with a gradient buffer of the same shape. A ``Module`` owns Params and
child Modules (found by walking its attributes in definition order, like PyTorch).

The backward contract, which every Module in the package follows:

- A layer's ``backward(grad_out) -> grad_in``: it accumulates its parameters' gradients into
  ``.grad`` and returns the gradient of its input (a layer that receives several outputs'
  gradients takes them in the same shape it returned its outputs: a tuple for a tuple, a dict of
  named levels for a dict).
- Some layers accept an optional keyword ``need_input_grad`` (``Conv2d`` does, and so do the
  backbone's blocks and stages): False skips the input gradient of the first layer, which a
  network never needs (the gradient of the image), and that backward returns None instead.
  ``Conv2d`` defaults to True; the backbone, whose input is the image, defaults to False.
- A module that owns a loss (the RPN, the RoI heads, the whole model) computes the loss
  gradient already in ``forward``, and its ``backward()`` takes no argument and returns the
  gradients of its differentiable inputs (the feature levels it read, as ``{name: gradient}``;
  the whole model reads images and returns nothing).
- Whatever a backward needs from its forward is kept in ``self.cache``: one name everywhere.
  Only in training mode: in eval mode (``model.eval()``) the layers run the forward-only
  kernels of ``inference.py`` and keep no cache (nothing is differentiated at inference, and
  the caches of a ResNet-50 at 800x1088 take gigabytes), so a ``backward`` after an eval-mode
  forward raises a RuntimeError (``forward_cache``) instead of using a stale cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import numpy as np

from ..backend import get_xp


class Param:
    """A trainable array ``data`` and its gradient ``grad`` (same shape and dtype).

    ``requires_grad=False`` marks a frozen buffer (FrozenBatchNorm statistics, frozen stages):
    it is saved in ``state_dict`` but the optimizer and gradcheck skip it.
    ``no_weight_decay`` lets the optimizer exclude norm scales and biases from L2 decay.
    """

    def __init__(self, data, requires_grad: bool = True, no_weight_decay: bool = False):
        self.data = data
        # zeros(), not zeros_like(): a large zero array is then mapped lazily, so a model that
        # only runs inference never holds its gradients' memory (~170 MB for ResNet-50-FPN)
        self.grad = get_xp(data).zeros(data.shape, dtype=data.dtype)
        self.requires_grad = requires_grad
        self.no_weight_decay = no_weight_decay

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    def zero_grad(self) -> None:
        self.grad[...] = 0

    def __repr__(self) -> str:
        return f"Param(shape={self.data.shape}, dtype={self.data.dtype})"


class Module:
    """Base class. Subclasses define ``forward`` and ``backward``.

    A layer's ``backward(grad_out) -> grad_in`` accumulates its parameters' gradients into
    ``.grad`` and returns the gradient of its input (several outputs' gradients come in the shape
    the outputs had: a tuple for a tuple, a dict of named levels for a dict); an optional
    ``need_input_grad=False`` skips the input gradient where a layer accepts it. A module that
    owns a loss computes its gradient in ``forward`` and has an argument-less ``backward()``
    that returns the gradients of its differentiable inputs. What a backward needs from its
    forward is kept in ``self.cache``.
    """

    training: bool = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):  # pragma: no cover - interface
        raise NotImplementedError

    def backward(self, grad_out):  # pragma: no cover - interface
        raise NotImplementedError

    def forward_cache(self):
        """``self.cache`` for a backward, or a RuntimeError when the last forward kept none
        (it ran in eval mode, or there was no forward)."""
        if getattr(self, "cache", None) is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward: no forward cache. Eval mode (model.eval()) "
                "keeps none; call model.train() before the forward you differentiate"
            )
        return self.cache

    # -- traversal -------------------------------------------------------------------------
    def named_children(self) -> Iterator[tuple[str, Module]]:
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)):
                for i, v in enumerate(value):
                    if isinstance(v, Module):
                        yield f"{name}.{i}", v

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Param]]:
        """All Params of this module and its children, with dotted names, frozen ones included."""
        for name, value in vars(self).items():
            if isinstance(value, Param):
                yield prefix + name, value
        for name, child in self.named_children():
            yield from child.named_parameters(prefix + name + ".")

    def parameters(self) -> list[Param]:
        """The trainable Params (``requires_grad`` True)."""
        return [p for _, p in self.named_parameters() if p.requires_grad]

    def modules(self) -> Iterator[Module]:
        yield self
        for _, child in self.named_children():
            yield from child.modules()

    # -- state -----------------------------------------------------------------------------
    def zero_grad(self) -> None:
        for _, p in self.named_parameters():
            p.zero_grad()

    def train(self, mode: bool = True) -> Module:
        """Set training mode (``mode=False``: eval mode) on this module and all its children.
        Switching to eval mode also drops every cache left by a training forward (its memory is
        freed, and a backward can no longer read a cache of another forward)."""
        for m in self.modules():
            m.training = mode
            if not mode and getattr(m, "cache", None) is not None:
                m.cache = None
        return self

    def eval(self) -> Module:
        return self.train(False)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Name -> NumPy array: on the CPU the live arrays (copy before mutating); from a GPU
        host copies, so a checkpoint is the same ``.npz`` whichever device wrote it."""
        from ..backend import to_host

        return {name: to_host(p.data) for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy arrays into the Params. Missing or unexpected keys and shape mismatches raise a
        ValueError that lists them all (``strict=False`` ignores missing/unexpected keys); so
        does an array holding NaN or inf, which would otherwise surface as NaN losses (or
        be hidden by later layers) far from its cause."""
        broken = nonfinite_entries(state)
        if broken:
            raise ValueError(
                f"load_state_dict into {type(self).__name__} refused: {broken[0]}; these "
                "weights are broken (saved from a diverged run?)"
            )
        own = dict(self.named_parameters())
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        problems = []
        if strict and missing:
            problems.append(f"missing keys: {missing}")
        if strict and unexpected:
            problems.append(f"unexpected keys: {unexpected}")
        for name in sorted(set(own) & set(state)):
            want, got = own[name].data.shape, tuple(np.shape(state[name]))
            if want != got:
                problems.append(f"shape mismatch for {name!r}: model has {want}, state has {got}")
        if problems:
            raise ValueError(
                f"load_state_dict into {type(self).__name__} failed: " + "; ".join(problems)
            )
        for name in set(own) & set(state):
            p = own[name]
            xp = get_xp(p.data)
            p.data[...] = xp.asarray(state[name], dtype=p.data.dtype)

    def astype(self, dtype) -> Module:
        """Cast every Param (and its grad) to ``dtype`` in place, e.g. float64 for gradchecks."""
        for _, p in self.named_parameters():
            p.data = p.data.astype(dtype)
            p.grad = p.grad.astype(dtype)
        return self

    def to(self, device) -> Module:
        """Move every Param (data and grad) and every other array this module and its children
        keep (buffers, caches; also inside lists, tuples and dicts) to ``device``; returns self.

        ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a registered device name
        (``backend.check_device``; the modules ``numpy`` and ``cupy`` are accepted too). Arrays
        already there are kept as they are, so ``to`` the current device copies nothing. A
        non-Module object with a ``to(device)`` method (the anchor generator, keeping anchors
        per device) is asked to move itself."""
        from ..backend import check_device, to_device

        if isinstance(device, ModuleType):
            device = "cpu" if device is np else "cuda"
        device = check_device(device)
        for m in self.modules():
            for name, value in list(vars(m).items()):
                if isinstance(value, Param):
                    value.data = to_device(value.data, device)
                    value.grad = to_device(value.grad, device)
                elif isinstance(value, Module) or _holds_modules(value):
                    continue  # visited by modules()
                elif callable(getattr(value, "to", None)) and not isinstance(value, type):
                    value.to(device)
                elif _holds_arrays(value):
                    setattr(m, name, to_device(value, device))
        return self

    def __repr__(self) -> str:
        n = sum(int(np.prod(p.shape)) for _, p in self.named_parameters())
        return f"{type(self).__name__}(params={n})"


def _holds_modules(value) -> bool:
    return isinstance(value, (list, tuple)) and any(isinstance(v, Module) for v in value)


def _holds_arrays(value) -> bool:
    """True for an array, or a list/tuple/dict (a NamedTuple cache too) holding one."""
    from ..backend import is_device_array

    if isinstance(value, np.ndarray) or is_device_array(value):
        return True
    if isinstance(value, dict):
        return any(_holds_arrays(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_arrays(v) for v in value)
    return False


def nonfinite_entries(state: dict) -> list[str]:
    """``"parameter 'name' holds k NaN or inf value(s) of n"`` for each float array of
    ``state`` (``{name: array}``) that is not all finite, in name order."""
    found = []
    for name in sorted(state):
        value = state[name]
        if getattr(value, "dtype", None) is None or value.dtype.kind not in "fc":
            continue
        bad = int((~get_xp(value).isfinite(value)).sum())
        if bad:
            found.append(f"parameter {name!r} holds {bad} NaN or inf value(s) of {value.size}")
    return found
