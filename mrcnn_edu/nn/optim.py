"""SGD with momentum and weight decay, and the warm-up + step-decay learning-rate schedule.

Both follow the references bit for bit where it matters for reproducing Mask R-CNN training:
``SGD`` is PyTorch's ``torch.optim.SGD`` (dampening 0, no Nesterov) and ``WarmupMultiStepLR`` is
detectron2's schedule of the same name. Their ``state_dict`` holds plain arrays and numbers only,
so a checkpoint written with :func:`mrcnn_edu.weights.save` resumes to the identical next step.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable

import numpy as np

from ..backend import device_of, get_xp, is_device_array, to_device, to_host
from .module import Param


class SGD:
    """Stochastic gradient descent with momentum and L2 weight decay (PyTorch semantics).

    For every Param ``p`` with gradient ``p.grad``, one ``step()`` does::

        g   = p.grad + weight_decay * p.data     # L2 decay folded into the gradient
        buf = g                     (first step)
        buf = momentum * buf + g    (later steps)
        p.data -= lr * buf

    Args:
        params: the Params to update (e.g. ``model.parameters()``); frozen ones
            (``requires_grad=False``) are skipped.
        lr: learning rate; a schedule may overwrite the ``lr`` attribute before each step.
        momentum: ``>= 0``; 0 keeps no buffers and gives plain SGD.
        weight_decay: ``>= 0`` L2 coefficient (Mask R-CNN: 1e-4).
        exclude_no_weight_decay: when True, Params with ``no_weight_decay=True`` (norm scales,
            biases) get no decay, as detectron2's ``WEIGHT_DECAY_NORM = 0`` does for norms.
    """

    def __init__(
        self,
        params: Iterable[Param],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        exclude_no_weight_decay: bool = True,
    ):
        params = list(params)
        if not params:
            raise ValueError("SGD got an empty parameter list; pass model.parameters()")
        for i, p in enumerate(params):
            if not isinstance(p, Param):
                raise ValueError(
                    f"SGD params[{i}] is a {type(p).__name__}, not a Param; pass model.parameters()"
                )
        if len({id(p) for p in params}) != len(params):
            raise ValueError("SGD got the same Param twice; it would be updated twice per step")
        _check_nonnegative(lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.params = [p for p in params if p.requires_grad]
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.exclude_no_weight_decay = bool(exclude_no_weight_decay)
        self.step_count = 0
        # One buffer per Param, created on the first step (PyTorch starts with buf = g, not 0).
        self.momentum_buffers: list | None = None

    def step(self) -> None:
        """Update every Param in place from its ``.grad`` (see the class docstring)."""
        first = self.momentum_buffers is None
        if first and self.momentum != 0:
            self.momentum_buffers = [None] * len(self.params)
        elif not first:
            self._follow_params()
        for i, p in enumerate(self.params):
            wd = self._decay_for(p)
            g = p.grad + wd * p.data if wd != 0 else p.grad
            if self.momentum != 0:
                if first:
                    self.momentum_buffers[i] = g.copy()
                else:
                    buf = self.momentum_buffers[i]
                    buf *= self.momentum
                    buf += g
                g = self.momentum_buffers[i]
            # In place so every view of p.data (the Module's attribute) sees the update.
            p.data -= self.lr * g
        self.step_count += 1

    def zero_grad(self) -> None:
        """Set every Param's gradient to 0 (backward passes accumulate)."""
        for p in self.params:
            p.zero_grad()

    def state_dict(self) -> dict:
        """Copies of the momentum buffers (keyed ``"0"``, ``"1"``, ... in ``params`` order; host
        NumPy arrays, also when the params live on a GPU) and the step count and
        hyperparameters; nested, ready for ``weights.save``."""
        buffers = {}
        if self.momentum_buffers is not None:
            buffers = {str(i): _host_copy(buf) for i, buf in enumerate(self.momentum_buffers)}
        return {
            "step": self.step_count,
            "num_params": len(self.params),
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "exclude_no_weight_decay": self.exclude_no_weight_decay,
            "momentum_buffers": buffers,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned (Python numbers or 0-d arrays both work, so a
        dict from ``weights.load(path, nested=True)`` can be passed straight in).

        Raises ValueError when the state was made for a different number of Params or its
        buffer shapes do not match them. The buffers are put where their params live (a
        checkpoint's host arrays go to the GPU of a GPU model).
        """
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError(
                "SGD.load_state_dict needs the nested dict from SGD.state_dict(); a checkpoint "
                "read with weights.load(path) must use nested=True"
            )
        num_params = int(_scalar(state.get("num_params", len(self.params))))
        if num_params != len(self.params):
            raise ValueError(
                f"SGD state is for {num_params} params but this optimizer has "
                f"{len(self.params)}; build the optimizer over the same model.parameters()"
            )
        raw = state.get("momentum_buffers", {})  # an empty dict is not stored in a .npz
        buffers = {str(k): v for k, v in raw.items()}
        expected = {str(i) for i in range(len(self.params))}
        if buffers and set(buffers) != expected:
            raise ValueError(
                f"SGD state has momentum buffers for keys {sorted(buffers, key=_int_or_str)}, "
                f"expected 0..{len(self.params) - 1} (one per param)"
            )
        new_buffers = None
        if buffers:
            mismatched = [
                f"param {i}: model {p.data.shape}, state {tuple(np.shape(buffers[str(i)]))}"
                for i, p in enumerate(self.params)
                if tuple(np.shape(buffers[str(i)])) != p.data.shape
            ]
            if mismatched:
                raise ValueError("SGD momentum buffer shape mismatch: " + "; ".join(mismatched))
            new_buffers = []
            for i, p in enumerate(self.params):
                xp = get_xp(p.data)
                new_buffers.append(xp.array(buffers[str(i)], dtype=p.data.dtype, copy=True))
        self.step_count = int(_scalar(state["step"]))
        self.lr = float(_scalar(state.get("lr", self.lr)))
        self.momentum = float(_scalar(state.get("momentum", self.momentum)))
        self.weight_decay = float(_scalar(state.get("weight_decay", self.weight_decay)))
        self.exclude_no_weight_decay = bool(
            _scalar(state.get("exclude_no_weight_decay", self.exclude_no_weight_decay))
        )
        if new_buffers is None and self.momentum != 0 and self.step_count > 0:
            raise ValueError(
                f"SGD state says {self.step_count} steps were taken with momentum "
                f"{self.momentum} but holds no momentum buffers; the checkpoint is incomplete"
            )
        self.momentum_buffers = new_buffers

    def _follow_params(self) -> None:
        """Move each momentum buffer to its param's device (after ``model.to(device)``), so the
        buffers always live where their params live."""
        for i, (p, buf) in enumerate(zip(self.params, self.momentum_buffers)):
            device = device_of(p.data)
            if device_of(buf) != device:
                self.momentum_buffers[i] = to_device(buf, device)

    def _decay_for(self, p: Param) -> float:
        if self.exclude_no_weight_decay and p.no_weight_decay:
            return 0.0
        return self.weight_decay


class WarmupMultiStepLR:
    """Linear (or constant) warm-up, then multiply by ``gamma`` at each milestone (detectron2).

    ``lr(it) = base_lr * warmup(it) * gamma ** bisect_right(milestones, it)`` with
    ``warmup(it) = warmup_factor * (1 - alpha) + alpha``, ``alpha = it / warmup_iters`` for
    ``it < warmup_iters`` ("linear"; "constant" uses ``warmup_factor``) and 1 afterwards.

    The schedule is indexed by the optimizer step about to be taken: construction sets
    ``optimizer.lr = lr_at(0)``, and each ``step()`` (call it after ``optimizer.step()``)
    advances ``iteration`` and sets ``optimizer.lr = lr_at(iteration)``.

    Args:
        optimizer: anything with a settable ``lr`` attribute (an :class:`SGD`).
        base_lr: the learning rate after warm-up and before the first milestone.
        milestones: strictly increasing iteration numbers where the rate drops by ``gamma``.
        gamma: the drop factor (0.1 in the paper's schedule).
        warmup_iters: length of the warm-up (0 disables it).
        warmup_factor: the fraction of ``base_lr`` used at iteration 0.
        warmup_method: "linear" or "constant".
    """

    def __init__(
        self,
        optimizer,
        base_lr: float,
        milestones: Iterable[int],
        gamma: float = 0.1,
        warmup_iters: int = 1000,
        warmup_factor: float = 1.0 / 1000,
        warmup_method: str = "linear",
    ):
        self.optimizer = optimizer
        self._configure(base_lr, milestones, gamma, warmup_iters, warmup_factor, warmup_method)
        self.iteration = 0
        self.optimizer.lr = self.lr_at(0)

    def lr_at(self, iteration: int) -> float:
        """The learning rate for optimizer step ``iteration`` (0-based); a pure function."""
        if int(iteration) != iteration or iteration < 0:
            raise ValueError(f"iteration must be a non-negative integer, got {iteration!r}")
        return (
            self.base_lr
            * self._warmup_factor_at(iteration)
            * self.gamma ** bisect_right(self.milestones, iteration)
        )

    def step(self) -> None:
        """Advance one iteration and set the optimizer's ``lr`` for it."""
        self.iteration += 1
        self.optimizer.lr = self.lr_at(self.iteration)

    def state_dict(self) -> dict:
        return {
            "iteration": self.iteration,
            "base_lr": self.base_lr,
            "milestones": np.asarray(self.milestones, dtype=np.int64),
            "gamma": self.gamma,
            "warmup_iters": self.warmup_iters,
            "warmup_factor": self.warmup_factor,
            "warmup_method": self.warmup_method,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the schedule and its position, and set the optimizer's ``lr`` to match."""
        missing = sorted(set(self.state_dict()) - set(state))
        if missing:
            raise ValueError(f"WarmupMultiStepLR state is missing keys {missing}")
        self._configure(
            float(_scalar(state["base_lr"])),
            [int(m) for m in np.asarray(state["milestones"]).reshape(-1)],
            float(_scalar(state["gamma"])),
            int(_scalar(state["warmup_iters"])),
            float(_scalar(state["warmup_factor"])),
            str(_scalar(state["warmup_method"])),
        )
        self.iteration = int(_scalar(state["iteration"]))
        self.optimizer.lr = self.lr_at(self.iteration)

    def _configure(self, base_lr, milestones, gamma, warmup_iters, warmup_factor, method):
        milestones = [int(m) for m in milestones]
        if any(b <= a for a, b in zip(milestones, milestones[1:])):
            raise ValueError(f"milestones must be strictly increasing, got {milestones}")
        if milestones and milestones[0] < 0:
            raise ValueError(f"milestones must be non-negative, got {milestones}")
        if method not in ("linear", "constant"):
            raise ValueError(f"warmup_method must be 'linear' or 'constant', got {method!r}")
        if int(warmup_iters) != warmup_iters or warmup_iters < 0:
            raise ValueError(f"warmup_iters must be a non-negative integer, got {warmup_iters}")
        _check_nonnegative(base_lr=base_lr, gamma=gamma, warmup_factor=warmup_factor)
        self.base_lr = float(base_lr)
        self.milestones = milestones
        self.gamma = float(gamma)
        self.warmup_iters = int(warmup_iters)
        self.warmup_factor = float(warmup_factor)
        self.warmup_method = method

    def _warmup_factor_at(self, iteration: int) -> float:
        if iteration >= self.warmup_iters:
            return 1.0
        if self.warmup_method == "constant":
            return self.warmup_factor
        alpha = iteration / self.warmup_iters
        return self.warmup_factor * (1 - alpha) + alpha


def _scalar(value):
    """A Python number or string from a Python value or a 0-d / 1-element array."""
    if isinstance(value, (int, float, str, bool)):
        return value
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"expected a single value in the state dict, got shape {arr.shape}")
    return arr.reshape(()).item()


def _host_copy(a) -> np.ndarray:
    """A NumPy copy of a host or device array."""
    return to_host(a) if is_device_array(a) else a.copy()


def _int_or_str(key: str):
    return (0, int(key), "") if key.isdigit() else (1, 0, key)


def _check_nonnegative(**values: float) -> None:
    for name, value in values.items():
        if not float(value) >= 0:  # also rejects NaN
            raise ValueError(f"{name} must be >= 0, got {value}")
