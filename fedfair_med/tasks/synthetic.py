"""The built-in synthetic tasks behind ``fedfair-med demo`` (see :mod:`fedfair_med.data.synthetic`)."""

from __future__ import annotations

import math
from typing import Any, Mapping

from fedfair_med.contracts import CLASSIFICATION, SEGMENTATION
from fedfair_med.data.federation import Federation
from fedfair_med.data.synthetic import synthetic_classification, synthetic_segmentation
from fedfair_med.tasks.base import Task, TaskDefaults, keyword_names


class _Synthetic(Task):
    """Data options are the generator's keyword parameters (``sites`` is code, not YAML)."""

    generator: Any = None

    def data_options(self) -> set[str]:
        # the generator's options, plus any a subclass's load_federation names (benchmarks do)
        return (keyword_names(type(self).generator) | keyword_names(self.load_federation)) - {"sites"}

    def data_problems(self, data: Mapping[str, Any]) -> list[str]:
        problems = super().data_problems(data)
        if problems:
            return problems
        scale, size, n_val = data.get("scale", 1.0), data.get("size", 32), data.get("n_val")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
            problems.append(f"scale: must be a positive number (it multiplies every split's size), got {scale!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 8:
            problems.append(f"size: must be an integer of at least 8 (pixels), got {size!r}")
        if n_val is not None and (isinstance(n_val, bool) or not isinstance(n_val, int) or n_val < 0):
            problems.append(f"n_val: must be a non-negative integer or null, got {n_val!r}")
        return problems


class SyntheticSegmentation(_Synthetic):
    name = "synthetic-seg"
    generator = staticmethod(synthetic_segmentation)
    kind = SEGMENTATION
    in_channels = 1
    defaults = TaskDefaults(network="unet", image_size=(32, 32), batch_size=8, lr=0.05,
                            optimizer="sgd", momentum=0.9, rounds=20, network_kwargs={"channels": (8, 16, 32)})

    def load_federation(self, seed: int = 0, **options: Any) -> Federation:
        return synthetic_segmentation(seed=seed, **options)


class SyntheticClassification(_Synthetic):
    name = "synthetic-cls"
    generator = staticmethod(synthetic_classification)
    kind = CLASSIFICATION
    in_channels = 3
    defaults = TaskDefaults(network="small_cnn", image_size=(32, 32), batch_size=16, lr=3e-3,
                            rounds=8)

    def load_federation(self, seed: int = 0, **options: Any) -> Federation:
        return synthetic_classification(seed=seed, **options)
