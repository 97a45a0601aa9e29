"""The run-directory contract every runtime writes, so reports and sweeps read one format.

``run.yaml`` (resolved configuration), ``metrics.jsonl`` (one JSON object per round),
``predictions.csv`` (per test sample; only in simulations — in a federation it stays at each
site), ``report.json`` / ``report.md`` / ``report.html`` and ``model.pt`` (final global weights).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import torch

from fedfair_med.config import RunConfig, dump_config
from fedfair_med.reporting.audit import json_safe

RUN_FILES = ("run.yaml", "metrics.jsonl", "report.json", "model.pt")


class RunDirectory:
    """Writes one run's files; creating it truncates a previous ``metrics.jsonl``."""

    def __init__(self, path: Path, config: RunConfig, **facts: Any) -> None:
        """``facts`` (task kind, primary metric, attributes, sites) are written beside the config."""
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        dump_config(config, self.path / "run.yaml", **facts)
        (self.path / "metrics.jsonl").write_text("")

    def log_round(self, record: Mapping[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(json_safe(dict(record)), sort_keys=False) + "\n")

    def save_model(self, state: Mapping[str, torch.Tensor]) -> Path:
        target = self.path / "model.pt"
        torch.save(dict(state), target)
        return target

    def save_predictions(self, predictions: pd.DataFrame) -> Path:
        target = self.path / "predictions.csv"
        predictions.to_csv(target, index=False)
        return target

    def write_json(self, name: str, content: Mapping[str, Any]) -> Path:
        target = self.path / name
        target.write_text(json.dumps(json_safe(dict(content)), indent=2))
        return target


def read_metrics(path: Path) -> list[dict[str, Any]]:
    lines = (Path(path) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]
