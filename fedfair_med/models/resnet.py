"""torchvision ResNet-50 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016).

Built with ``weights=None`` — torchvision never downloads here. ImageNet (or any) weights come
only from a local file passed as ``weights=PATH`` to :func:`fedfair_med.models.build_network`;
the classifier head is replaced for ``out_channels`` classes, so a 1000-class checkpoint's ``fc``
tensors are skipped for their shape and every other tensor loads.
"""

from __future__ import annotations

from torch import nn

from fedfair_med.models import register


@register("resnet50")
def _resnet50(in_channels: int, out_channels: int, spatial_dims: int = 2) -> nn.Module:
    """ResNet-50 classifier: (B, in_channels, H, W) → (B, out_channels) logits."""
    if spatial_dims != 2:
        raise ValueError("resnet50 (torchvision) is a 2D network (spatial_dims=2)")
    from torchvision.models import resnet50

    model = resnet50(weights=None)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    model.fc = nn.Linear(model.fc.in_features, out_channels)
    return model
