"""Network registry: a task names its network; users may pick another by name.

Every builder takes ``in_channels``, ``out_channels`` and ``spatial_dims`` and returns an
``nn.Module`` mapping (B, C, *spatial) to (B, out_channels, *spatial) for segmentation or
(B, out_channels) for classification. No builder downloads anything: pretrained weights come
only from a local file the user names (``weights=PATH``).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

Builder = Callable[..., nn.Module]
NETWORKS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def wrap(fn: Builder) -> Builder:
        NETWORKS[name] = fn
        return fn

    return wrap


@register("unet")
def _unet(in_channels: int, out_channels: int, spatial_dims: int = 2,
          channels: tuple[int, ...] = (8, 16, 32), strides: tuple[int, ...] | None = None,
          num_res_units: int = 1, norm: str = "batch") -> nn.Module:
    """MONAI UNet; the default (8, 16, 32) is CPU-sized, (16, 32, 64, 128) for studies."""
    from monai.networks.nets import UNet

    channels = tuple(channels)
    strides = tuple(strides) if strides is not None else (2,) * (len(channels) - 1)
    return UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                channels=channels, strides=strides, num_res_units=num_res_units, norm=norm)


@register("basicunet")
def _basicunet(in_channels: int, out_channels: int, spatial_dims: int = 2,
               features: tuple[int, ...] = (8, 8, 16, 32, 64, 8)) -> nn.Module:
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=spatial_dims, in_channels=in_channels,
                     out_channels=out_channels, features=tuple(features))


NORMS = ("batch", "group", "instance")
GROUPS = 16  # channel groups of GroupNorm; ResNet-18's widths (64…512) are all multiples


def replace_batch_norm(model: nn.Module, norm: str) -> nn.Module:
    """Swap every BatchNorm layer for ``norm`` (``group`` or ``instance``), in place.

    Why: BatchNorm keeps running means of each site's activations, and FedAvg averages them
    across sites whose label mix differs (HAM10000's sites: 3 % to 35 % malignant), so the global
    model normalises with statistics no site sees. Group and instance norm keep none. (MONAI
    1.6.1's ResNet passes its ``norm`` argument only to the stem, so the swap is done here.)
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, not {norm!r}")
    if norm == "batch":
        return model
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            channels = child.num_features
            if norm == "group":
                layer: nn.Module = nn.GroupNorm(math.gcd(GROUPS, channels), channels)
            else:
                instance = {nn.BatchNorm1d: nn.InstanceNorm1d, nn.BatchNorm2d: nn.InstanceNorm2d,
                            nn.BatchNorm3d: nn.InstanceNorm3d}[type(child)]
                layer = instance(channels, affine=True)
            setattr(model, name, layer)
        else:
            replace_batch_norm(child, norm)
    return model


@register("resnet18")
def _resnet18(in_channels: int, out_channels: int, spatial_dims: int = 2,
              norm: str = "batch", stem_stride: int = 1) -> nn.Module:
    """MONAI ResNet-18 classifier; ``norm: group`` for federations with label-skewed sites.

    MONAI's stem keeps full resolution (stride 1, made for small 3D volumes), so at 64² the
    first stage runs on 32² maps; ``stem_stride: 2`` is the ImageNet stem (16² there), about
    3× cheaper per image on CPU.
    """
    from monai.networks.nets import resnet18

    if stem_stride not in (1, 2):
        raise ValueError(f"stem_stride must be 1 or 2, not {stem_stride!r}")
    return replace_batch_norm(resnet18(spatial_dims=spatial_dims, n_input_channels=in_channels,
                                       num_classes=out_channels, conv1_t_stride=stem_stride), norm)


@register("densenet121")
def _densenet121(in_channels: int, out_channels: int, spatial_dims: int = 2) -> nn.Module:
    from monai.networks.nets import DenseNet121

    return DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels,
                       out_channels=out_channels)


@register("small_cnn")
def _small_cnn(in_channels: int, out_channels: int, spatial_dims: int = 2,
               width: int = 16) -> nn.Module:
    """A four-layer CNN classifier for the synthetic federation and fast tests."""
    if spatial_dims != 2:
        raise ValueError("small_cnn is 2D only")
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, out_channels),
    )


def build_network(name: str, *, in_channels: int, out_channels: int, spatial_dims: int = 2,
                  weights: str | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered network; ``weights`` loads a local state-dict file (never downloads)."""
    try:
        builder = NETWORKS[name]
    except KeyError:
        raise ValueError(f"unknown network {name!r}; choose one of {sorted(NETWORKS)}") from None
    model = builder(in_channels=in_channels, out_channels=out_channels,
                    spatial_dims=spatial_dims, **kwargs)
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        own = model.state_dict()
        # Tensors of another shape (e.g. a 1000-class head) are skipped, not fatal.
        state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not state:
            raise ValueError(f"{weights}: no tensor matches network {name!r}")
        model.load_state_dict(state, strict=False)
    return model


# Networks defined in their own modules register themselves on import.
from fedfair_med.models import resnet as _resnet, sanet as _sanet  # noqa: E402,F401
