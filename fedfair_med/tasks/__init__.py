"""Clinical tasks, one module each with the same shape; :data:`TASKS` maps names to classes."""

from __future__ import annotations

from fedfair_med.tasks.base import Task
from fedfair_med.tasks.synthetic import SyntheticClassification, SyntheticSegmentation

TASKS: dict[str, type[Task]] = {
    "synthetic-seg": SyntheticSegmentation,
    "synthetic-cls": SyntheticClassification,
}


def build_task(name: str) -> Task:
    try:
        return TASKS[name]()
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}") from None
