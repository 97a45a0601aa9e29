"""Clinical tasks, one module each with the same shape; :data:`TASKS` maps names to classes.

The registry imports a task's module on first use, so validating a configuration or starting
the CLI does not pay for MONAI's import unless a MONAI task is actually used.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from fedfair_med.tasks.base import Task

_LOCATIONS: dict[str, str] = {
    "synthetic-seg": "fedfair_med.tasks.synthetic:SyntheticSegmentation",
    "synthetic-cls": "fedfair_med.tasks.synthetic:SyntheticClassification",
    "polyp": "fedfair_med.tasks.polyp:PolypTask",
    "fundus": "fedfair_med.tasks.fundus:FundusTask",
    "mri": "fedfair_med.tasks.mri:MRITask",
    "skin": "fedfair_med.tasks.skin:SkinTask",
}


class _LazyRegistry(Mapping[str, type[Task]]):
    """name → Task class, importing the class's module when it is first looked up."""

    def __init__(self, locations: dict[str, str]) -> None:
        self._locations = locations

    def __getitem__(self, name: str) -> type[Task]:
        module, _, attr = self._locations[name].partition(":")
        return getattr(importlib.import_module(module), attr)

    def __contains__(self, name: object) -> bool:
        return name in self._locations

    def __iter__(self) -> Iterator[str]:
        return iter(self._locations)

    def __len__(self) -> int:
        return len(self._locations)


TASKS: Mapping[str, type[Task]] = _LazyRegistry(_LOCATIONS)


def build_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]()
