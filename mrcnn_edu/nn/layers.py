"""Layers: Modules that hold Params and call the forward/backward pairs of ``functional.py``.

In training mode each layer keeps what its *last* forward left for the backward in
``self.cache``; in eval mode it calls the forward-only kernels of ``inference.py`` and keeps
nothing (``self.cache = None``: a backward then raises, see ``Module.forward_cache``);
``backward(grad_out) -> grad_in`` uses it, accumulates the parameter gradients into
``param.grad`` and returns the gradient with respect to the input (the contract is written out
in ``module.py``). Weight layouts are PyTorch's, so a state dict maps name for name.
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import get_xp
from . import functional as F
from . import inference as I
from .module import Module, Param
from .utils import add_param_grads, as_generator, pair


def _weight_and_bias(rng, fan_in: int, weight_shape, out_features: int, bias: bool, dtype):
    """PyTorch's default initialisation: weight and bias uniform in +-1/sqrt(fan_in)
    (Kaiming-uniform with a = sqrt(5)). Biases are excluded from weight decay."""
    bound = 1.0 / math.sqrt(fan_in)
    weight = Param(rng.uniform(-bound, bound, size=weight_shape).astype(dtype))
    if not bias:
        return weight, None
    b = rng.uniform(-bound, bound, size=(out_features,)).astype(dtype)
    return weight, Param(b, no_weight_decay=True)


class Conv2d(Module):
    """2-D convolution by im2col + GEMM. weight: (out, in, kh, kw); bias: (out,).

    Initialisation is PyTorch's default (Kaiming-uniform with a = sqrt(5), i.e. a uniform bound
    of 1/sqrt(fan_in) for both weight and bias); pass ``rng`` (a seed or Generator) for
    reproducibility.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
        rng=None,
        dtype=np.float32,
    ):
        kh, kw = pair(kernel_size, "kernel_size", minimum=1)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        rng = as_generator(rng)
        self.weight, self.bias = _weight_and_bias(
            rng,
            in_channels * kh * kw,
            (out_channels, in_channels, kh, kw),
            out_channels,
            bias,
            dtype,
        )
        self.cache = None

    def forward(self, x):
        if not self.training:
            self.cache = None
            return self.infer(x)
        b = self.bias.data if self.bias is not None else None
        y, self.cache = F.conv2d_forward(
            x, self.weight.data, b, self.stride, self.padding, self.dilation
        )
        return y

    def infer(self, x, relu: bool = False):
        """The eval-mode forward (``inference.conv2d``: no cache); ``relu=True`` adds a ReLU
        in place (what a block that owns both layers does)."""
        b = self.bias.data if self.bias is not None else None
        w = self.weight.data
        return I.conv2d(x, w, b, self.stride, self.padding, self.dilation, relu=relu)

    def backward(self, grad_out, need_input_grad: bool = True):
        dx, dw, db = F.conv2d_backward(grad_out, self.forward_cache(), need_input_grad)
        add_param_grads(self, dw, db)
        return dx


class ConvTranspose2d(Module):
    """Transposed convolution. weight: (in, out, kh, kw) (PyTorch's layout); bias: (out,).

    The mask head uses k=2, s=2 to double 14x14 RoI features to 28x28."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        output_padding=0,
        dilation=1,
        bias: bool = True,
        rng=None,
        dtype=np.float32,
    ):
        kh, kw = pair(kernel_size, "kernel_size", minimum=1)
        self.stride, self.padding = stride, padding
        self.output_padding, self.dilation = output_padding, dilation
        rng = as_generator(rng)
        # PyTorch computes fan_in from weight.size(1) * kh * kw for transposed convolutions.
        self.weight, self.bias = _weight_and_bias(
            rng,
            out_channels * kh * kw,
            (in_channels, out_channels, kh, kw),
            out_channels,
            bias,
            dtype,
        )
        self.cache = None

    def forward(self, x):
        if not self.training:
            self.cache = None
            return self.infer(x)
        b = self.bias.data if self.bias is not None else None
        y, self.cache = F.conv_transpose2d_forward(
            x, self.weight.data, b, self.stride, self.padding, self.output_padding, self.dilation
        )
        return y

    def infer(self, x, relu: bool = False):
        """The eval-mode forward (``inference.conv_transpose2d``: no cache), optionally with
        a ReLU in place."""
        b = self.bias.data if self.bias is not None else None
        args = (self.stride, self.padding, self.output_padding, self.dilation)
        return I.conv_transpose2d(x, self.weight.data, b, *args, relu=relu)

    def backward(self, grad_out):
        dx, dw, db = F.conv_transpose2d_backward(grad_out, self.forward_cache())
        add_param_grads(self, dw, db)
        return dx


class Linear(Module):
    """Fully connected layer. weight: (out, in); bias: (out,). Input (N, in)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, rng=None, dtype=np.float32
    ):
        rng = as_generator(rng)
        self.weight, self.bias = _weight_and_bias(
            rng, in_features, (out_features, in_features), out_features, bias, dtype
        )
        self.cache = None

    def forward(self, x):
        b = self.bias.data if self.bias is not None else None
        y, cache = F.linear_forward(x, self.weight.data, b)
        self.cache = cache if self.training else None  # the cache holds the input
        return y

    def backward(self, grad_out):
        dx, dw, db = F.linear_backward(grad_out, self.forward_cache())
        add_param_grads(self, dw, db)
        return dx


class ReLU(Module):
    def __init__(self):
        self.cache = None

    def forward(self, x):
        if not self.training:
            self.cache = None
            return get_xp(x).maximum(x, 0)  # = relu_forward's values (NaN kept), no mask
        y, self.cache = F.relu_forward(x)
        return y

    def backward(self, grad_out):
        return F.relu_backward(grad_out, self.forward_cache())


class MaxPool2d(Module):
    """Max pooling; ties go to the first maximum in row-major window order."""

    def __init__(self, kernel_size, stride=None, padding=0):
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.cache = None

    def forward(self, x):
        if not self.training:
            self.cache = None
            return I.max_pool2d(x, self.kernel_size, self.stride, self.padding)
        y, self.cache = F.max_pool2d_forward(x, self.kernel_size, self.stride, self.padding)
        return y

    def backward(self, grad_out):
        return F.max_pool2d_backward(grad_out, self.forward_cache())


class Upsample(Module):
    """Nearest-neighbour resize to a target size given at call time (FPN's top-down path
    resizes the coarser map to the finer map's exact shape, odd sizes included)."""

    def __init__(self):
        self.cache = None

    def forward(self, x, size=None):
        if size is None:
            raise ValueError("Upsample.forward needs the target size (Ho, Wo)")
        y, cache = F.upsample_nearest_forward(x, size)
        self.cache = cache if self.training else None
        return y

    def backward(self, grad_out):
        return F.upsample_nearest_backward(grad_out, self.forward_cache())


class FrozenBatchNorm2d(Module):
    """BatchNorm2d with frozen statistics and affine parameters (none are trained).

    The four arrays are Params with ``requires_grad=False`` so they live in the state dict
    (and load from converted checkpoints) but the optimizer never touches them."""

    def __init__(self, num_features: int, eps: float = 1e-5, dtype=np.float32):
        self.eps = eps
        self.weight = Param(np.ones(num_features, dtype), requires_grad=False)
        self.bias = Param(np.zeros(num_features, dtype), requires_grad=False)
        self.running_mean = Param(np.zeros(num_features, dtype), requires_grad=False)
        self.running_var = Param(np.ones(num_features, dtype), requires_grad=False)
        self.cache = None

    def forward(self, x):
        y, cache = F.frozen_batch_norm_forward(
            x,
            self.weight.data,
            self.bias.data,
            self.running_mean.data,
            self.running_var.data,
            self.eps,
        )
        self.cache = cache if self.training else None
        return y

    def backward(self, grad_out):
        return F.frozen_batch_norm_backward(grad_out, self.forward_cache())


class GroupNorm(Module):
    """GroupNorm(num_groups, num_channels) with a per-channel affine transform."""

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        dtype=np.float32,
    ):
        if num_channels % num_groups:
            raise ValueError(
                f"GroupNorm: num_channels={num_channels} not divisible by num_groups={num_groups}"
            )
        self.num_groups, self.eps = num_groups, eps
        self.weight = Param(np.ones(num_channels, dtype), no_weight_decay=True) if affine else None
        self.bias = Param(np.zeros(num_channels, dtype), no_weight_decay=True) if affine else None
        self.cache = None

    def forward(self, x):
        w = self.weight.data if self.weight is not None else None
        b = self.bias.data if self.bias is not None else None
        y, cache = F.group_norm_forward(x, self.num_groups, w, b, self.eps)
        self.cache = cache if self.training else None
        return y

    def backward(self, grad_out):
        dx, dw, db = F.group_norm_backward(grad_out, self.forward_cache())
        if self.weight is not None:
            add_param_grads(self, dw, db)
        return dx


class Flatten(Module):
    """(N, ...) -> (N, prod(...))."""

    def __init__(self):
        self.cache = None  # the input shape

    def forward(self, x):
        self.cache = x.shape if self.training else None
        return x.reshape(x.shape[0], -1)

    def backward(self, grad_out):
        return grad_out.reshape(self.forward_cache())


class Sequential(Module):
    """Applies layers in order; backward runs them in reverse."""

    def __init__(self, *layers: Module):
        self.layers = list(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, grad_out):
        for layer in reversed(self.layers):
            grad_out = layer.backward(grad_out)
        return grad_out

    def named_children(self):
        # Children are named "0", "1", ... as in torch.nn.Sequential, so state-dict keys match.
        for i, layer in enumerate(self.layers):
            yield str(i), layer

    def __getitem__(self, i: int) -> Module:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)
