"""Retinal vessel segmentation in fundus photographs (e.g. CHASE_DB1 and STARE as two sites).

2D RGB → one vessel logit per pixel. When a manifest row names a field-of-view (``fov``) mask,
pixels outside the camera's circular aperture are excluded from the loss, the fairness risk and
the Dice metric (see :class:`~fedfair_med.tasks.imaging.MaskedSegmentationTask`, whose
``sample_loss``, ``task_loss`` and ``sample_metric`` this task uses): that black border is trivially
"background" and would otherwise inflate agreement and differ between cameras. Rows without a
mask count the whole image (an all-ones ``fov`` is added so every batch has the same keys).

CPU default size 128 × 128: vessels are 1–15 px wide in ~1000 px photographs, so at 128² only the
main arcades survive (≈ 1–2 px wide); 256² (the pooled reference in ``shared/data/README.md``)
keeps more capillaries at 4× the cost. Masks are resized with nearest-neighbour so they stay binary.
"""

from __future__ import annotations

from monai.transforms import Compose

from fedfair_med.contracts import SEGMENTATION
from fedfair_med.tasks.base import TaskDefaults
from fedfair_med.tasks.imaging import (
    FOV, IMAGE, LABEL, BinariseMaskd, EnsureChannelsd, FullMaskd, MaskedSegmentationTask,
    finish, load_rgb, resize_pair, to_unit_range,
)


class FundusTask(MaskedSegmentationTask):
    name = "fundus"
    kind = SEGMENTATION
    in_channels = 3
    uses_fov = True
    defaults = TaskDefaults(network="unet", image_size=(128, 128), batch_size=4, lr=1e-3, rounds=20,
                            network_kwargs={"channels": (16, 32, 64, 128)})

    def _common(self) -> list:
        return [
            load_rgb([IMAGE, LABEL, FOV]),
            EnsureChannelsd(keys=[IMAGE], channels=3),
            BinariseMaskd(keys=[LABEL, FOV], allow_missing_keys=True),
            to_unit_range(IMAGE),
            *resize_pair([IMAGE], [LABEL, FOV], self.image_size),
            FullMaskd(FOV, like=LABEL),
        ]

    def train_transforms(self) -> Compose:
        return Compose([*self._common(), *self.augmentations([IMAGE, LABEL, FOV]),
                        finish([IMAGE, LABEL, FOV])])

    def eval_transforms(self) -> Compose:
        return Compose([*self._common(), finish([IMAGE, LABEL, FOV])])
