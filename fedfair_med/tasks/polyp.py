"""Polyp segmentation in colonoscopy frames (e.g. CVC-ClinicDB and Kvasir-SEG as two sites).

2D RGB → one foreground logit per pixel; loss Dice + BCE (:meth:`Task.task_loss`), metric Dice.
Sites differ mostly in colour and illumination (different endoscopes and video processors), so
training adds per-channel gain/offset (hue/saturation-like shifts), contrast and gamma jitter on
top of flips and right-angle rotations. Masks stored as JPEG are thresholded at > 127.

CPU default size 96 × 96: polyps cover roughly 2–30 % of a frame, so even a small one (≈ 20 px in
a 384 × 288 CVC frame) keeps ≈ 5 px at 96², while a step costs about half of 128² (the pooled
reference setting in ``shared/data/README.md``); at 64² small polyps shrink to 2–3 px. The
network defaults to a CPU-sized MONAI UNet; ``network: sanet`` selects SANet (Wei et al., MICCAI
2021), the polyp architecture of the paper this project follows.
"""

from __future__ import annotations

from monai.transforms import Compose

from fedfair_med.contracts import SEGMENTATION
from fedfair_med.tasks.base import TaskDefaults
from fedfair_med.tasks.imaging import (
    IMAGE, LABEL, BinariseMaskd, EnsureChannelsd, ImagingTask, colour_augmentation,
    finish, load_rgb, resize_pair, to_unit_range,
)


class PolypTask(ImagingTask):
    name = "polyp"
    kind = SEGMENTATION
    in_channels = 3
    defaults = TaskDefaults(network="unet", image_size=(96, 96), batch_size=8, lr=1e-3, rounds=20,
                            network_kwargs={"channels": (16, 32, 64, 128)})

    def _common(self) -> list:
        return [
            load_rgb([IMAGE, LABEL]),
            EnsureChannelsd(keys=[IMAGE], channels=3),
            BinariseMaskd(keys=[LABEL]),
            to_unit_range(IMAGE),
            *resize_pair([IMAGE], [LABEL], self.image_size),
        ]

    def train_transforms(self) -> Compose:
        return Compose([*self._common(), *self.augmentations([IMAGE, LABEL]),
                        finish([IMAGE, LABEL])])

    def eval_transforms(self) -> Compose:
        return Compose([*self._common(), finish([IMAGE, LABEL])])
