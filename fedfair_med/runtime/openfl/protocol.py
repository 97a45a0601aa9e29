"""The wire protocol shared by our aggregator and collaborators on top of OpenFL 1.9.

Three things OpenFL does not give us and both sides must agree on:

* **A lossless, dtype-preserving codec.** OpenFL's default pipeline casts every tensor to float32;
  FlexFair's group sums, the evaluation summaries and BatchNorm counters would then differ from the
  simulation. :class:`LosslessPipeline` ships raw bytes with ``[dtype code, *shape]`` as metadata.
* **A phase schedule.** OpenFL runs every task of a round back to back at a collaborator and only
  aggregates at the round's end, so "train, aggregate, evaluate the new model" needs two OpenFL
  rounds per method round. Method round r trains in OpenFL round r−1 and is evaluated at the start
  of OpenFL round r (together with the next training); one extra OpenFL round evaluates the final
  model. Methods with a forward-only statistics pass get one more OpenFL round per method round
  (statistics → aggregate → train). :class:`Schedule` maps OpenFL rounds to phases and
  :class:`PhaseAssigner` hands out exactly those tasks.
* **Names on the wire.** Model tensors keep their state-dict names. The server state travels as one
  serialised tensor :data:`SERVER_STATE` inside the model's tensor dict, so collaborators receive it
  with the model; collaborators answer with an empty placeholder under that name so OpenFL creates
  the next round's slot. Method extras travel as ``extra/<name>``, evaluation summaries as
  ``summary/<attribute>`` (fixed-size count/sum tables over a vocabulary fixed in the plan).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from openfl.component.assigner.assigner import Assigner
from openfl.pipelines.pipeline import TransformationPipeline, Transformer

TRAIN, EVALUATE, STATISTICS = "fedfair_train", "fedfair_evaluate", "fedfair_statistics"
SERVER_STATE = "__server_state__"
EXTRA_PREFIX = "extra/"
SUMMARY_PREFIX = "summary/"
NUM_SAMPLES = "extra/__num_samples__"
MODEL_TAG, TRAINED_TAG, EXTRA_TAG, SUMMARY_TAG = "model", "trained", "fedfair_extra", "fedfair_summary"
#: The columns of a summary table row, in the order :func:`site_summary` accumulates them.
SUMMARY_FIELDS = ("n", "metric", "score", "n_pos", "score_pos")

_DTYPES = ["float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool",
           "uint64"]  # uint64: secure aggregation's masked fixed-point tensors


class _RawBytes(Transformer):
    """numpy array ⇄ bytes, keeping dtype and shape exactly (lossless)."""

    def __init__(self) -> None:
        self.lossy = False

    def forward(self, data: Any, **kwargs: Any) -> tuple[bytes, dict[str, list[int]]]:
        array = np.array(data, copy=True, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        name = array.dtype.name
        if name not in _DTYPES:
            raise TypeError(f"cannot send a tensor of dtype {name}")
        return array.tobytes(order="C"), {"int_list": [_DTYPES.index(name), *array.shape]}

    def backward(self, data: bytes, metadata: Mapping[str, Any], **kwargs: Any) -> np.ndarray:
        code, *shape = list(metadata["int_list"])
        flat = np.frombuffer(data, dtype=np.dtype(_DTYPES[code]))
        return flat.reshape(tuple(shape)).copy()


class LosslessPipeline(TransformationPipeline):
    """The plan's ``compression_pipeline``: no compression, no float32 cast."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(transformers=[_RawBytes()], **kwargs)


# ---- server state ⇄ one uint8 tensor --------------------------------------------------------
def pack_state(state: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Serialise a dict of tensors (the method's server state) into one uint8 array."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buffer)
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8).copy()


def unpack_state(array: np.ndarray) -> dict[str, torch.Tensor]:
    if array.size == 0:
        return {}
    return torch.load(io.BytesIO(np.asarray(array, dtype=np.uint8).tobytes()), weights_only=True)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().copy()


def to_torch(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True))


# ---- evaluation summaries ⇄ fixed-size tables ------------------------------------------------
def summary_to_tables(summary: Mapping[str, Any], vocabularies: Mapping[str, Sequence[str]]
                      ) -> dict[str, np.ndarray]:
    """A :func:`site_summary` as float64 tables: ``overall`` [5] and one [V, 5] per attribute.

    Groups outside an attribute's vocabulary are refused: the vocabulary is part of the plan so
    every table has the same shape at every site (no value, only counts and sums, travels).
    """
    tables = {"overall": np.array([float(summary["overall"][f]) for f in SUMMARY_FIELDS])}
    for attribute, vocabulary in vocabularies.items():
        table = np.zeros((len(vocabulary), len(SUMMARY_FIELDS)), dtype=np.float64)
        for value, acc in summary["groups"].get(attribute, {}).items():
            if value not in vocabulary:
                raise ValueError(f"attribute {attribute!r} has value {value!r}, which is not in the "
                                 f"federation's vocabulary {list(vocabulary)}")
            table[list(vocabulary).index(value)] = [float(acc[f]) for f in SUMMARY_FIELDS]
        tables[attribute] = table
    return tables


def tables_to_summary(tables: Mapping[str, np.ndarray], vocabularies: Mapping[str, Sequence[str]]
                      ) -> dict[str, Any]:
    """Inverse of :func:`summary_to_tables` (groups with n = 0 were absent and stay absent)."""
    overall = dict(zip(SUMMARY_FIELDS, (float(v) for v in tables["overall"])))
    groups: dict[str, dict[str, dict[str, float]]] = {}
    for attribute, vocabulary in vocabularies.items():
        table = tables.get(attribute)
        if table is None:
            continue
        rows = {value: dict(zip(SUMMARY_FIELDS, (float(v) for v in table[i])))
                for i, value in enumerate(vocabulary) if table[i][0] > 0}
        if rows:
            groups[attribute] = rows
    return {"overall": overall, "groups": groups}


# ---- phases --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    """Which tasks OpenFL round k runs, and which method round each task belongs to."""

    rounds: int
    statistics: bool = False

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
        self.schedule = Schedule(int(schedule["rounds"]), bool(schedule["statistics"]))
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


# ---- the federation spec every component reads from the plan ------------------------------
@dataclass(frozen=True)
class FederationSpec:
    """What the plan fixes for everyone: the run configuration, the sites, the vocabularies."""

    run: dict[str, Any]
    sites: list[str]
    vocabularies: dict[str, list[str]]
    group_vocabulary: list[str]
    attributes: list[str]
    schedule: Schedule
    #: sites send masked tensors; the aggregator decodes only sums (runtime/openfl/secure.py)
    secure_aggregation: bool = False

    @classmethod
    def from_settings(cls, spec: Mapping[str, Any]) -> "FederationSpec":
        return cls(run=dict(spec["run"]), sites=list(spec["sites"]),
                   vocabularies={k: list(v) for k, v in spec["vocabularies"].items()},
                   group_vocabulary=list(spec["group_vocabulary"]),
                   attributes=list(spec["attributes"]),
                   schedule=Schedule(int(spec["schedule"]["rounds"]),
                                     bool(spec["schedule"]["statistics"])),
                   secure_aggregation=bool(spec.get("secure_aggregation", False)))

    def config(self) -> Any:
        from fedfair_med.config import RunConfig

        return RunConfig(**self.run)
