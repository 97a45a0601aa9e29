"""Clinical tasks, one module each with the same shape; :data:`TASKS` maps names to classes."""

from __future__ import annotations

from fedfair_med.tasks.base import Task
from fedfair_med.tasks.fundus import FundusTask
from fedfair_med.tasks.mri import MRITask
from fedfair_med.tasks.polyp import PolypTask
from fedfair_med.tasks.skin import SkinTask
from fedfair_med.tasks.synthetic import SyntheticClassification, SyntheticSegmentation

TASKS: dict[str, type[Task]] = {
    "synthetic-seg": SyntheticSegmentation,
    "synthetic-cls": SyntheticClassification,
    "polyp": PolypTask,
    "fundus": FundusTask,
    "mri": MRITask,
    "skin": SkinTask,
}


def build_task(name: str) -> Task:
    try:
        return TASKS[name]()
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}") from None
