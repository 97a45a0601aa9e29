r"""Structural re-parameterisation of convolutions (RepVGG: Ding et al., "RepVGG: Making VGG-style
ConvNets Great Again", CVPR 2021), used by resource-adaptive federated training.

A :class:`RepConv` adds ``c`` parallel branches to a convolution ``W * x + b``:

.. math::

    y = W * x + b + \sum_{i=1}^{c} \mathrm{N}_i(K_i * x)

Each branch convolves with the main convolution's geometry (stride, padding, padding mode,
dilation, groups) so outputs align; a 1×1 branch kernel is zero-padded to the main kernel's size
(at its centre tap), so it reads exactly the input the main kernel's centre reads. Each branch
norm ``N_i`` is initialised with scale γ = 0, so the expanded network computes the base network's
function exactly when training starts.

Merging (eval-mode semantics, i.e. with the norms' running statistics) is exact because a norm
with frozen statistics is a per-channel affine map ``N(z) = s ⊙ z + h`` and convolution is linear
in its kernel: ``W' = W + Σ_i s_i ⊙ K_i`` and ``b' = b + Σ_i h_i``.

The bias question. A BatchNorm branch folds to ``s = γ/√(σ² + ε)``, ``h = β − s μ``: a per-channel
shift that needs a bias to live in. When the main convolution has no bias, the merged model could
not hold it without changing the base state-dict keys, so those branches use
:class:`UncentredBatchNorm` instead: it divides by the root mean square ``√(E[z²] + ε)`` (batch
statistic in training, running statistic in eval) and has a scale but no shift and no mean
subtraction, so ``h = 0`` exactly and the merge stays lossless. Transposed convolutions are left
as they are.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

KERNEL_CHOICES = ("same", "1x1")
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class UncentredBatchNorm(nn.Module):
    r"""Per-channel ``y = γ z / √(E[z²] + ε)``: BatchNorm without centring or shift.

    Used for branches of a bias-free convolution so the folded branch adds no bias (see module
    docstring). ``E[z²]`` is the batch mean over (N, spatial) in training, tracked with momentum.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.register_buffer("running_sq", torch.ones(num_features))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (z.dim() - 2)
        if self.training:
            dims = [0] + list(range(2, z.dim()))
            mean_sq = (z * z).mean(dims)
            with torch.no_grad():
                self.running_sq.mul_(1.0 - self.momentum).add_(self.momentum * mean_sq.detach())
        else:
            mean_sq = self.running_sq
        return z * (self.weight / torch.sqrt(mean_sq + self.eps)).view(shape)


def fold_norm(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale s, shift h) in float64 such that ``norm(z) = s ⊙ z + h`` in eval mode."""
    if isinstance(norm, UncentredBatchNorm):
        scale = norm.weight.double() / torch.sqrt(norm.running_sq.double() + norm.eps)
        return scale, torch.zeros_like(scale)
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        std = torch.sqrt(norm.running_var.double() + norm.eps)
        scale = norm.weight.double() / std
        return scale, norm.bias.double() - scale * norm.running_mean.double()
    raise TypeError(f"cannot fold {type(norm).__name__}")


class ConvBranch(nn.Module):
    """One extra branch: a kernel (``same`` size as the main one, or ``1x1``) and a norm with γ = 0."""

    def __init__(self, main: nn.modules.conv._ConvNd, kernel: str) -> None:
        super().__init__()
        if kernel not in KERNEL_CHOICES:
            raise ValueError(f"kernel must be one of {KERNEL_CHOICES}, got {kernel!r}")
        dims = len(main.kernel_size)
        own = tuple(main.kernel_size) if kernel == "same" else (1,) * dims
        # zero-padding (before, after) per spatial dim putting a 1×1 tap at the main kernel's centre
        self.pads = [((k - o) // 2, k - o - (k - o) // 2) for k, o in zip(main.kernel_size, own)]
        w = main.weight
        self.weight = nn.Parameter(
            torch.empty((w.shape[0], w.shape[1]) + own, device=w.device, dtype=w.dtype)
        )
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # torch's own conv initialisation
        norm_cls = _BATCHNORMS[dims] if main.bias is not None else UncentredBatchNorm
        self.norm = norm_cls(w.shape[0]).to(device=w.device, dtype=w.dtype)
        nn.init.zeros_(self.norm.weight)

    def full_kernel(self) -> torch.Tensor:
        """The branch kernel zero-padded to the main kernel's size."""
        flat = [p for pair in reversed(self.pads) for p in pair]  # F.pad wants last dim first
        return F.pad(self.weight, flat) if any(flat) else self.weight


class RepConv(nn.Module):
    """A convolution plus ``num_branches`` parallel branches; :meth:`merged` folds them back."""

    def __init__(self, main: nn.modules.conv._ConvNd, num_branches: int, kernel: str = "same") -> None:
        super().__init__()
        self.main = main
        self.branches = nn.ModuleList(ConvBranch(main, kernel) for _ in range(num_branches))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.main(x)
        for branch in self.branches:
            # the main conv's own geometry (padding mode, stride, dilation, groups), no bias
            out = out + branch.norm(self.main._conv_forward(x, branch.full_kernel(), None))
        return out

    @torch.no_grad()
    def merged(self) -> nn.modules.conv._ConvNd:
        """The main convolution with every branch folded in: W + Σ s_i ⊙ K_i, b + Σ h_i."""
        main = self.main
        weight = main.weight.double().clone()
        bias = main.bias.double().clone() if main.bias is not None else None
        view = (-1,) + (1,) * (weight.dim() - 1)
        for branch in self.branches:
            scale, shift = fold_norm(branch.norm)
            weight += branch.full_kernel().double() * scale.view(view)
            if bias is not None:
                bias += shift
            elif torch.any(shift != 0):  # cannot happen: bias-free convs get uncentred norms
                raise RuntimeError("a branch of a bias-free convolution produced a shift")
        main.weight.copy_(weight.to(main.weight.dtype))
        if bias is not None:
            main.bias.copy_(bias.to(main.bias.dtype))
        return main


def _convolutions(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, _CONV_TYPES) and not isinstance(parent, RepConv)
    ]


def expand_convolutions(model: nn.Module, num_branches: int, kernel: str = "same") -> nn.Module:
    """A deep copy of ``model`` with every Conv1d/2d/3d wrapped in a :class:`RepConv`."""
    if num_branches < 0:
        raise ValueError(f"num_branches must be >= 0, got {num_branches}")
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"kernel must be one of {KERNEL_CHOICES}, got {kernel!r}")
    expanded = copy.deepcopy(model)
    for parent, name, conv in _convolutions(expanded):
        parent._modules[name] = RepConv(conv, num_branches, kernel)
    return expanded


def merge_convolutions(model: nn.Module) -> nn.Module:
    """Replace every :class:`RepConv` in ``model`` (in place) by its merged convolution.

    The result has the base model's modules in the same places, hence the same state-dict keys,
    order and shapes.
    """
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, RepConv)
    ]
    for parent, name, rep in targets:
        parent._modules[name] = rep.merged()
    return model
