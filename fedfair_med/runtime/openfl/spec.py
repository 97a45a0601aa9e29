"""What a federation's plan fixes for every component, and the plan's fingerprint.

The aggregator and each collaborator read the same settings from the plan (the run
configuration, the sites, the group vocabularies, the phase schedule); :class:`FederationSpec`
is that reading. :func:`plan_fingerprint` is how either side tells an edited plan from the one
the coordinating centre issued.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fedfair_med.runtime.openfl.schedule import Schedule


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
                                     bool(spec["schedule"]["statistics"]),
                                     bool(spec["schedule"].get("secure", False))),
                   secure_aggregation=bool(spec.get("secure_aggregation", False)))

    def config(self) -> Any:
        from fedfair_med.config import RunConfig

        return RunConfig(**self.run)


def bootstrap_replicates(spec: Mapping[str, Any]) -> int:
    """B, the plan's number of Poisson-bootstrap replicates (``bootstrap_replicates``, default 1000)."""
    from fedfair_med.fairness.bootstrap import DEFAULT_REPLICATES

    return int(spec.get("bootstrap_replicates", DEFAULT_REPLICATES))


def plan_fingerprint(plan_dir: Path) -> str:
    """sha256 over plan.yaml and cols.yaml: a checkpoint resumes only the plan that wrote it."""
    digest = hashlib.sha256()
    for name in ("plan.yaml", "cols.yaml"):
        digest.update(name.encode() + b"\0" + (Path(plan_dir) / name).read_bytes() + b"\0")
    return digest.hexdigest()
