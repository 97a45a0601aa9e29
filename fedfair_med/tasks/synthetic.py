"""The built-in synthetic tasks behind ``fedfair-med demo`` (see :mod:`fedfair_med.data.synthetic`)."""

from __future__ import annotations

from typing import Any

from fedfair_med.data.federation import Federation
from fedfair_med.data.synthetic import synthetic_classification, synthetic_segmentation
from fedfair_med.tasks.base import CLASSIFICATION, SEGMENTATION, Task, TaskDefaults


class SyntheticSegmentation(Task):
    name = "synthetic-seg"
    kind = SEGMENTATION
    in_channels = 1
    defaults = TaskDefaults(network="unet", image_size=(32, 32), batch_size=8, lr=0.05,
                            optimizer="sgd", momentum=0.9, rounds=20, network_kwargs={"channels": (8, 16, 32)})

    def load_federation(self, seed: int = 0, **options: Any) -> Federation:
        return synthetic_segmentation(seed=seed, **options)


class SyntheticClassification(Task):
    name = "synthetic-cls"
    kind = CLASSIFICATION
    in_channels = 3
    defaults = TaskDefaults(network="small_cnn", image_size=(32, 32), batch_size=16, lr=3e-3,
                            rounds=8)

    def load_federation(self, seed: int = 0, **options: Any) -> Federation:
        return synthetic_classification(seed=seed, **options)
