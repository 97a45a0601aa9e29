r"""SANet for polyp segmentation: a Res2Net-50 backbone with shallow attention.

Wei, Hu, Zhang, Li, Zhou, Cui, "Shallow Attention Network for Polyp Segmentation", MICCAI 2021
(arXiv:2108.00882). Backbone: Res2Net (Gao et al., "Res2Net: A New Multi-scale Backbone
Architecture", TPAMI 2019), the ``v1b_26w_4s`` variant (deep 3×3 stem, average-pool shortcuts).

**Res2Net bottleneck.** A 1×1 convolution gives ``s·w`` channels, split into ``s`` groups
``x_1 … x_s``; groups are processed hierarchically so each sees a larger receptive field:

.. math::

    y_1 = K_1(x_1), \qquad y_i = K_i(x_i + y_{i-1})\ (1 < i < s), \qquad y_s = x_s

(in a stage's first block ``y_i = K_i(x_i)`` and the last group is average-pooled instead), then
a 1×1 convolution fuses ``[y_1 … y_s]`` and a residual connection is added.

**Shallow attention.** With decoder features ``f_3, f_4, f_5`` (strides 8, 16, 32, each reduced
to ``c`` channels and upsampled to stride 8), the high-resolution shallow feature is gated by the
deeper, more semantic ones, which suppresses the background texture that shallow features respond
to:

.. math::

    \text{logit} = W * [\,f_5,\ f_4 \odot f_5,\ f_3 \odot f_4 \odot f_5\,]

followed by bilinear upsampling to the input size.

**Probability correction** (PCS, inference only). Small polyps are outnumbered by background, so
their logits are depressed; PCS rescales each image's positive and negative logits by the
fraction of pixels on that side: ``z⁺ ← z⁺ / mean[z > 0]``, ``z⁻ ← z⁻ / mean[z < 0]``. Signs are
unchanged (hard masks do not move), confidences of the minority side grow. Off by default so the
reported probabilities are the network's own.

The paper's colour-exchange augmentation is a data-side operation; the polyp task's colour
jitter plays that role here. Attribute names follow the public Res2Net checkpoint layout
(``conv1``/``bn1``/``layer1…4``, ``convs``/``bns`` in blocks) so a local Res2Net-50 file loads with
``backbone_weights=PATH``. Nothing is downloaded.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedfair_med.models import register


class Bottle2neck(nn.Module):
    """Res2Net bottleneck: hierarchical 3×3 convolutions over ``scale`` channel groups."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, base_width: int = 26, scale: int = 4,
                 first_in_stage: bool = False) -> None:
        super().__init__()
        if scale < 2:
            raise ValueError("Res2Net scale must be at least 2")
        width = int(math.floor(planes * base_width / 64.0))
        self.width, self.scale, self.first_in_stage = width, scale, first_in_stage
        self.conv1 = nn.Conv2d(inplanes, width * scale, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scale)
        self.convs = nn.ModuleList(
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False) for _ in range(scale - 1)
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(scale - 1))
        # The untouched last group must match the strided groups' resolution in a stage's first block.
        self.pool = nn.AvgPool2d(3, stride=stride, padding=1) if first_in_stage else None
        self.conv3 = nn.Conv2d(width * scale, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        groups = torch.split(out, self.width, dim=1)
        outputs = []
        previous = None
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            part = groups[i] if (previous is None or self.first_in_stage) else groups[i] + previous
            previous = self.relu(bn(conv(part)))
            outputs.append(previous)
        last = groups[-1]
        outputs.append(self.pool(last) if self.pool is not None else last)
        out = self.bn3(self.conv3(torch.cat(outputs, dim=1)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Res2Net(nn.Module):
    """Res2Net-v1b feature extractor returning the stride-4, 8, 16 and 32 feature maps."""

    def __init__(self, in_channels: int = 3, layers: Sequence[int] = (3, 4, 6, 3),
                 base_planes: int = 64, base_width: int = 26, scale: int = 4) -> None:
        super().__init__()
        stem = max(base_planes // 2, 1)
        self.inplanes = base_planes
        self.base_width, self.scale = base_width, scale
        # v1b deep stem: three 3×3 convolutions instead of one 7×7.
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
            nn.Conv2d(stem, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
            nn.Conv2d(stem, base_planes, 3, 1, 1, bias=False),
        )
        self.bn1 = nn.BatchNorm2d(base_planes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._stage(base_planes, layers[0], stride=1)
        self.layer2 = self._stage(base_planes * 2, layers[1], stride=2)
        self.layer3 = self._stage(base_planes * 4, layers[2], stride=2)
        self.layer4 = self._stage(base_planes * 8, layers[3], stride=2)
        self.out_channels = tuple(base_planes * m * Bottle2neck.expansion for m in (1, 2, 4, 8))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        out_planes = planes * Bottle2neck.expansion
        if stride != 1 or self.inplanes != out_planes:
            # v1b shortcut: average-pool then 1×1 conv, so no input pixel is skipped by a stride.
            downsample = nn.Sequential(
                nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False),
                nn.Conv2d(self.inplanes, out_planes, 1, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        modules = [Bottle2neck(self.inplanes, planes, stride, downsample, self.base_width,
                               self.scale, first_in_stage=True)]
        self.inplanes = out_planes
        modules += [Bottle2neck(self.inplanes, planes, 1, None, self.base_width, self.scale)
                    for _ in range(1, blocks)]
        return nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return c2, c3, c4, c5


def _reduce(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class SANet(nn.Module):
    """Res2Net backbone + shallow-attention decoder; outputs (B, out_channels, H, W) logits."""

    def __init__(self, in_channels: int = 3, out_channels: int = 1, channels: int = 64,
                 layers: Sequence[int] = (3, 4, 6, 3), base_planes: int = 64, base_width: int = 26,
                 scale: int = 4, probability_correction: bool = False) -> None:
        super().__init__()
        self.backbone = Res2Net(in_channels, layers, base_planes, base_width, scale)
        _, c3, c4, c5 = self.backbone.out_channels
        self.linear3 = _reduce(c3, channels)
        self.linear4 = _reduce(c4, channels)
        self.linear5 = _reduce(c5, channels)
        self.predict = nn.Conv2d(3 * channels, out_channels, 1)
        self.probability_correction = probability_correction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c3, c4, c5 = self.backbone(x)
        size = c3.shape[2:]
        f3 = self.linear3(c3)
        f4 = F.interpolate(self.linear4(c4), size=size, mode="bilinear", align_corners=False)
        f5 = F.interpolate(self.linear5(c5), size=size, mode="bilinear", align_corners=False)
        fused = torch.cat([f5, f4 * f5, f3 * f4 * f5], dim=1)
        logits = F.interpolate(self.predict(fused), size=x.shape[2:], mode="bilinear",
                               align_corners=False)
        if self.probability_correction and not self.training:
            logits = probability_correction(logits)
        return logits


def probability_correction(logits: torch.Tensor) -> torch.Tensor:
    """Per image: divide positive logits by the positive fraction, negative by the negative one."""
    flat = logits.flatten(1)
    pos = (flat > 0).to(flat.dtype).mean(1, keepdim=True).clamp_min(1e-6)
    neg = (flat < 0).to(flat.dtype).mean(1, keepdim=True).clamp_min(1e-6)
    corrected = torch.where(flat > 0, flat / pos, torch.where(flat < 0, flat / neg, flat))
    return corrected.view_as(logits)


def load_backbone_weights(backbone: nn.Module, path: str) -> None:
    """Load a local Res2Net state dict into ``backbone`` (shape-mismatched tensors skipped)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    own = backbone.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"{path}: no tensor matches the Res2Net backbone of 'sanet'")
    backbone.load_state_dict(usable, strict=False)


@register("sanet")
def _sanet(in_channels: int, out_channels: int, spatial_dims: int = 2, channels: int = 64,
           layers: Sequence[int] = (3, 4, 6, 3), base_planes: int = 64, base_width: int = 26,
           scale: int = 4, probability_correction: bool = False,
           backbone_weights: str | None = None) -> nn.Module:
    """SANet (Res2Net-50 26w×4s by default); shrink ``layers``/``base_planes`` for CPU tests."""
    if spatial_dims != 2:
        raise ValueError("sanet is a 2D network (spatial_dims=2)")
    model = SANet(in_channels, out_channels, channels, tuple(layers), base_planes, base_width,
                  scale, probability_correction)
    if backbone_weights is not None:
        load_backbone_weights(model.backbone, backbone_weights)
    return model
