"""Which tasks a collaborator runs in each OpenFL round, and which method round each belongs to.

OpenFL runs every task of a round back to back at a collaborator and only aggregates at the
round's end, so "train, aggregate, evaluate the new model" needs two OpenFL rounds per method
round. Method round r trains in OpenFL round r−1 and is evaluated at the start of OpenFL round r
(together with the next training); one extra OpenFL round evaluates the final model. Methods with
a forward-only statistics pass get one more OpenFL round per method round (statistics → aggregate
→ train). With secure aggregation every masked phase is framed by a key round and an unmasking
round inside the same OpenFL round. :class:`Schedule` maps OpenFL rounds to phases and
:class:`PhaseAssigner` (named in the plan) hands out exactly those tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from openfl.component.assigner.assigner import Assigner

TRAIN, EVALUATE, STATISTICS = "fedfair_train", "fedfair_evaluate", "fedfair_statistics"
#: secure aggregation's key round (before a masked phase) and unmasking round (after it)
SECAGG_KEYS, SECAGG_UNMASK = "fedfair_secagg_keys", "fedfair_secagg_unmask"


@dataclass(frozen=True)
class Schedule:
    """Which tasks OpenFL round k runs, and which method round each task belongs to."""

    rounds: int
    statistics: bool = False
    #: secure aggregation: each masked phase is framed by SECAGG_KEYS and SECAGG_UNMASK
    secure: bool = False

    @property
    def openfl_rounds(self) -> int:
        return 2 * self.rounds + 1 if self.statistics else self.rounds + 1

    def tasks(self, k: int) -> list[str]:
        out: list[str] = []
        if self.evaluated_round(k) is not None:
            out.append(EVALUATE)
        if self.statistics_round(k) is not None:
            out.append(STATISTICS)
        if self.train_round(k) is not None:
            out.append(TRAIN)
        if self.secure and (STATISTICS in out or TRAIN in out):
            out.insert(out.index(STATISTICS if STATISTICS in out else TRAIN), SECAGG_KEYS)
            out.append(SECAGG_UNMASK)
        return out

    def train_round(self, k: int) -> int | None:
        if self.statistics:
            return (k + 1) // 2 if k % 2 == 1 and k < 2 * self.rounds else None
        return k + 1 if 0 <= k < self.rounds else None

    def statistics_round(self, k: int) -> int | None:
        if self.statistics and k % 2 == 0 and k < 2 * self.rounds:
            return k // 2 + 1
        return None

    def evaluated_round(self, k: int) -> int | None:
        """The method round whose aggregate is evaluated in OpenFL round k (None: no evaluation)."""
        if self.statistics:
            return k // 2 if k % 2 == 0 and k >= 2 else None
        return k if 1 <= k <= self.rounds else None


class PhaseAssigner(Assigner):
    """Every collaborator gets the tasks :class:`Schedule` lists for the round."""

    def __init__(self, tasks: Any, authorized_cols: list[str], rounds_to_train: int,
                 schedule: Mapping[str, Any], **kwargs: Any) -> None:
        self.schedule = Schedule(int(schedule["rounds"]), bool(schedule["statistics"]),
                                 bool(schedule.get("secure", False)))
        super().__init__(tasks, authorized_cols, rounds_to_train, **kwargs)
        self.define_task_assignments()

    def define_task_assignments(self) -> None:
        self.all_tasks_in_groups = list(self.tasks)

    def get_tasks_for_collaborator(self, collaborator_name: str, round_number: int) -> list[str]:
        return self.schedule.tasks(round_number)

    def get_collaborators_for_task(self, task_name: str, round_number: int) -> list[str]:
        return list(self.authorized_cols) if task_name in self.schedule.tasks(round_number) else []

    def get_all_tasks_for_round(self, round_number: int) -> list[str]:
        return self.schedule.tasks(round_number)
