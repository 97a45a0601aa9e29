"""The run-directory contract every runtime writes, so reports and sweeps read one format.

``run.yaml`` (resolved configuration), ``metrics.jsonl`` (one JSON object per round),
``predictions.csv`` (per test sample; only in simulations — in a federation it stays at each
site), ``report.json`` / ``report.md`` / ``report.html``, ``model.pt`` (final global weights) and
``status.json`` (``complete`` once every other file is written).

A run is written into a hidden sibling (``.NAME.incomplete-PID``) and renamed into place only
when it is complete, so an interrupted or crashed run never leaves a half-written directory
under NAME nor touches a previous run there: an audit must never print one run's numbers under
another run's name. A leftover staging directory says ``running`` in its status.json, and
``report`` refuses it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import torch

from fedfair_med.config import RunConfig, dump_config
from fedfair_med.reporting.audit import json_safe

STATUS_FILE = "status.json"
STAGING_MARK = ".incomplete-"


class RunExistsError(ValueError):
    """The target already holds a run and replacing it was not asked for (one-line message)."""


def holds_run(path: Path) -> bool:
    """True when ``path`` is a non-empty directory or a file: something a run would replace."""
    path = Path(path)
    if path.is_dir():
        return any(path.iterdir())
    return path.exists()


def check_target(path: Path, force: bool = False) -> None:
    """Refuse (``RunExistsError``) to write a run over an existing one unless ``force``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunExistsError(f"{path} exists and is not a directory")
    if holds_run(path) and not force:
        raise RunExistsError(
            f"{path} already holds a run; give another --out, or --force to replace it")


def read_status(path: Path) -> dict[str, Any] | None:
    """``status.json`` of a run directory; None when absent (directories from older versions)."""
    target = Path(path) / STATUS_FILE
    if not target.exists():
        return None
    try:
        status = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"status": "unreadable"}
    return status if isinstance(status, dict) else {"status": "unreadable"}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_staging(final: Path) -> None:
    """Staging directories of runs into ``final`` whose process is gone (SIGKILL, power loss).

    A process killed inside :meth:`RunDirectory.commit`, between its two renames, leaves a
    complete run under a hidden name and none at ``final``: that run is put back, not deleted
    (its new run first, else the one it was replacing).
    """
    if not final.parent.is_dir():
        return
    candidates = sorted(final.parent.glob(f".{final.name}{STAGING_MARK}*"),
                        key=lambda c: "replaced" in c.name)
    for candidate in candidates:
        pid = candidate.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        if not final.exists() and (read_status(candidate) or {}).get("status") == "complete":
            os.replace(candidate, final)
        else:
            shutil.rmtree(candidate, ignore_errors=True)


def staging_path(final: Path) -> Path:
    """Where this process writes the run that will become ``final``."""
    final = Path(final)
    return final.parent / f".{final.name}{STAGING_MARK}{os.getpid()}"


def discard_staging(final: Path) -> None:
    """Remove this process's unfinished run into ``final`` (interrupted or failed at any point,
    even while the staging directory was being created); ``final`` itself is untouched."""
    shutil.rmtree(staging_path(final), ignore_errors=True)


class RunDirectory:
    """Writes one run's files into a staging directory; :meth:`commit` moves it into place.

    Until then ``path`` (the final location) is untouched; ``staging`` is where files go.
    """

    def __init__(self, path: Path, config: RunConfig, *, force: bool = False, **facts: Any) -> None:
        """``facts`` (task kind, primary metric, attributes, sites) are written beside the config.

        Refuses (:class:`RunExistsError`) when ``path`` already holds a run and not ``force``.
        """
        self.path = Path(path)
        check_target(self.path, force)
        self.force = force
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_staging(self.path)
        check_target(self.path, force)  # a run put back by the clean-up counts as well
        self.staging = staging_path(self.path)
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir()
        self._started = time.time()
        self._status("running")
        dump_config(config, self.staging / "run.yaml", **facts)
        (self.staging / "metrics.jsonl").write_text("")

    def _status(self, status: str, **extra: Any) -> None:
        content = {"status": status, "pid": os.getpid(),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._started)),
                   **extra}
        tmp = self.staging / (STATUS_FILE + ".tmp")
        tmp.write_text(json.dumps(content, indent=1) + "\n", encoding="utf-8")
        tmp.replace(self.staging / STATUS_FILE)

    def log_round(self, record: Mapping[str, Any]) -> None:
        with open(self.staging / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(json_safe(dict(record)), sort_keys=False) + "\n")

    def save_model(self, state: Mapping[str, torch.Tensor]) -> Path:
        target = self.staging / "model.pt"
        torch.save(dict(state), target)
        return target

    def save_predictions(self, predictions: pd.DataFrame) -> Path:
        target = self.staging / "predictions.csv"
        predictions.to_csv(target, index=False)
        return target

    def write_json(self, name: str, content: Mapping[str, Any]) -> Path:
        target = self.staging / name
        target.write_text(json.dumps(json_safe(dict(content)), indent=2))
        return target

    def commit(self, keep_previous: bool = False) -> Path:
        """Mark the run complete and rename it into place; return the final path.

        A run already at ``path`` (allowed by ``force``) is moved aside first and then deleted,
        or kept as ``NAME.previous-N`` with ``keep_previous``. Killed between the two renames,
        the previous run is still whole under its aside name.
        """
        self._status("complete", finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        aside: Path | None = None
        if self.path.exists():
            n = 1
            while True:
                suffix = f".previous-{n}" if keep_previous else f"{STAGING_MARK}replaced-{os.getpid()}"
                aside = self.path.parent / ((self.path.name if keep_previous else "." + self.path.name)
                                            + suffix)
                if not aside.exists():
                    break
                n += 1
            os.replace(self.path, aside)
        os.replace(self.staging, self.path)
        if aside is not None and not keep_previous:
            shutil.rmtree(aside, ignore_errors=True)
        return self.path

    def discard(self) -> None:
        """Remove the staging directory (an interrupted or failed run); ``path`` is untouched."""
        shutil.rmtree(self.staging, ignore_errors=True)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    lines = (Path(path) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]
