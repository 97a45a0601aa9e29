"""The run-directory contract: the one module that writes and reads a run's files.

``run.yaml`` (configuration, plus the ``resolved`` facts of the run set-up), ``metrics.jsonl``
(one :func:`round_record` per round, built the same way by every runtime), ``predictions.csv``
(per test sample; only in simulations — in a federation it stays at each site), ``report.json``
/ ``report.md`` / ``report.html`` (:func:`write_reports`), ``model.pt`` (final global weights),
``privacy.json`` / ``federation.json`` when they apply, and ``status.json`` (``complete`` once
every other file is written). Reports, sweeps and the CLI read them with the ``read_*``
functions here, so a file's format is known in one place.

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
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import yaml

from fedfair_med.config import RunConfig, dump_config
from fedfair_med.contracts import CLASSIFICATION, SEGMENTATION, TASK_KINDS
from fedfair_med.fairness.site_summaries import combine_summaries
from fedfair_med.reporting.render import render_html, render_markdown
from fedfair_med.reporting.run_report import CORE_COLUMNS, build_run_report, json_safe

STATUS_FILE = "status.json"
REPORT_FILE = "report.json"
STAGING_MARK = ".incomplete-"


def round_record(round_index: int, *, elapsed_s: float, train_loss: Mapping[str, float],
                 test: Mapping[str, Any] | None, classification: bool,
                 val: Mapping[str, Any] | None = None, dropped: Sequence[str] = (),
                 privacy: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One line of ``metrics.jsonl``, built the same way by every runtime.

    ``test`` and ``val`` are the sites' evaluation summaries (``site_summary``, what a site may
    send), combined here into the pooled metric, per-site and per-group tables and the gaps;
    ``test`` None records the round as not evaluated (readers look for ``metric``).
    ``dropped``: sites that did not report; ``privacy``: the budget spent so far.
    """
    record: dict[str, Any] = {"round": round_index, "elapsed_s": round(elapsed_s, 3),
                              "train_loss": dict(train_loss)}
    if test is None:
        record["evaluated"] = False
    else:
        record.update(combine_summaries(test, classification=classification))
        if val is not None:
            record["val"] = combine_summaries(val, classification=classification)
    if dropped:
        record["dropped"] = sorted(dropped)
    if privacy is not None:
        record["privacy"] = dict(privacy)
    return record


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

    def keep_failed(self, error: BaseException) -> Path | None:
        """Move a run that failed with ``error`` beside ``path`` as ``NAME.failed[-N]``.

        Why: a crash after hours of rounds (a bug in report writing, a full disk) must not take
        the rounds' metrics and checkpoints with it. The folder is visible and its status.json
        says ``failed`` with the error, so it is never taken for a result (``report`` refuses
        it); ``path`` itself is untouched.
        """
        if not self.staging.is_dir():
            return None
        self._status("failed", error=f"{type(error).__name__}: {error}",
                      failed=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        target, n = self.path.parent / f"{self.path.name}.failed", 1
        while target.exists():
            n += 1
            target = self.path.parent / f"{self.path.name}.failed-{n}"
        os.replace(self.staging, target)
        return target

    def discard(self) -> None:
        """Remove the staging directory (an interrupted or failed run); ``path`` is untouched."""
        shutil.rmtree(self.staging, ignore_errors=True)


# ---- reading (and the reports made from what was read) ----------------------------------------
class RunDirectoryError(ValueError):
    """The run directory is missing, incomplete or unreadable (message fits on one line)."""


def read_run_yaml(run_dir: Path) -> dict[str, Any]:
    """``run.yaml`` as a plain dict ({} when the file is absent) — unlike
    :func:`fedfair_med.config.load_config`, no :class:`RunConfig` and no validation, so a report
    renders whatever configuration the run recorded."""
    path = Path(run_dir) / "run.yaml"
    if not path.exists():
        return {}
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise RunDirectoryError(f"{path} is not valid YAML ({type(err).__name__})") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise RunDirectoryError(f"{path} must hold a mapping, not {type(config).__name__}")
    return config


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The per-round records of ``metrics.jsonl`` ([] when absent); blank lines are skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rounds = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise RunDirectoryError(f"{path}:{number} is not valid JSON") from None
        if not isinstance(record, dict) or "round" not in record:
            raise RunDirectoryError(f"{path}:{number} is not a round record (no 'round' key)")
        rounds.append(record)
    return sorted(rounds, key=lambda r: r["round"])


def read_predictions(run_dir: Path) -> pd.DataFrame | None:
    """``predictions.csv`` (None when absent). Only empty cells count as missing values."""
    path = Path(run_dir) / "predictions.csv"
    if not path.exists():
        return None
    try:
        frame = pd.read_csv(path, dtype={"id": str, "site": str}, keep_default_na=False,
                            na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise RunDirectoryError(f"{path} could not be read as CSV ({type(err).__name__})") from None
    for column in ("site", "metric"):
        if column not in frame.columns:
            raise RunDirectoryError(f"{path} has no {column!r} column")
    if len(frame) == 0:
        raise RunDirectoryError(f"{path} has no rows")
    return frame


def _task_field(config: Mapping[str, Any], key: str) -> Any:
    """A fact about the run: top level, under ``resolved`` (what runtimes write) or ``task``."""
    if key in config:
        return config[key]
    for section in ("resolved", "task"):
        value = config.get(section)
        if isinstance(value, Mapping) and key in value:
            return value[key]
    return None


def infer_kind(config: Mapping[str, Any], predictions: pd.DataFrame) -> str:
    """``kind`` from run.yaml (top level or under ``task``), else from the predictions.

    The fallback calls a run classification when y_true and y_pred are 0/1 labels and the
    metric is exactly their agreement (1/0 correctness); per-image Dice is not.
    """
    kind = _task_field(config, "kind")
    if kind in TASK_KINDS:
        return str(kind)
    needed = {"y_true", "y_pred", "metric"}
    if needed <= set(predictions.columns):
        y_true = pd.to_numeric(predictions["y_true"], errors="coerce")
        y_pred = pd.to_numeric(predictions["y_pred"], errors="coerce")
        metric = pd.to_numeric(predictions["metric"], errors="coerce")
        labels = y_true.isin([0, 1]).all() and y_pred.isin([0, 1]).all()
        if labels and np.array_equal(metric.to_numpy(), (y_true == y_pred).to_numpy(float)):
            return CLASSIFICATION
    return SEGMENTATION


def infer_attributes(config: Mapping[str, Any], predictions: pd.DataFrame) -> list[str]:
    """Sensitive attributes: run.yaml's ``attributes`` list, else every non-core CSV column."""
    listed = _task_field(config, "attributes")
    if isinstance(listed, (list, tuple)) and listed:
        return [str(a) for a in listed]
    return [c for c in predictions.columns if c not in CORE_COLUMNS]


def write_reports(
    run_dir: Path,
    *,
    min_group_size: int = 10,
    age_edges: Sequence[float] = (60,),
    n_boot: int = 1000,
    seed: int = 0,
    report: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write report.json, report.md and report.html.

    report.json is ``report`` when given (a federation's, built from the sites' summaries), else
    recomputed from predictions.csv when present, else the one already there (rendered as is).

    Returns {"json": path, "markdown": path, "html": path}. Raises :class:`RunDirectoryError`
    when ``run_dir`` is not a directory or has neither predictions.csv nor report.json.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise RunDirectoryError(f"run directory {str(run_dir)!r} does not exist")
    if not run_dir.is_dir():
        raise RunDirectoryError(f"{str(run_dir)!r} is not a directory")
    config = read_run_yaml(run_dir)
    rounds = read_metrics(run_dir)
    predictions = read_predictions(run_dir)
    json_path = run_dir / REPORT_FILE
    if report is not None:
        report = write_report(run_dir, report)
    elif predictions is not None:
        kind = infer_kind(config, predictions)
        primary = _task_field(config, "primary_metric") or (
            "dice" if kind == SEGMENTATION else "accuracy")
        try:
            built = build_run_report(
                predictions, kind=kind, attributes=infer_attributes(config, predictions),
                primary_metric=str(primary), age_edges=tuple(age_edges),
                min_group_size=min_group_size, n_boot=n_boot, seed=seed,
            )
        except ValueError as err:
            raise RunDirectoryError(f"{run_dir / 'predictions.csv'}: {err}") from None
        report = write_report(run_dir, built)
    elif json_path.exists():
        report = read_report(run_dir)
    else:
        raise RunDirectoryError(
            f"{str(run_dir)!r} has neither predictions.csv nor report.json; is it a run directory?"
        )
    md_path = run_dir / "report.md"
    html_path = run_dir / "report.html"
    md_path.write_text(render_markdown(report, config, rounds), encoding="utf-8")
    html_path.write_text(render_html(report, config, rounds), encoding="utf-8")
    return {"json": json_path, "markdown": md_path, "html": html_path}


def write_report(run_dir: Path, report: Mapping[str, Any]) -> dict[str, Any]:
    """``report.json`` (strict JSON: NaN as null); returns what was written."""
    content = json_safe(dict(report))
    (Path(run_dir) / REPORT_FILE).write_text(json.dumps(content, indent=2, allow_nan=False) + "\n",
                                             encoding="utf-8")
    return content


def read_report(run_dir: Path) -> dict[str, Any]:
    """``report.json``, checked to be a fedfair-med report (:class:`RunDirectoryError` if not)."""
    path = Path(run_dir) / REPORT_FILE
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirectoryError(f"{path} does not exist") from None
    except json.JSONDecodeError:
        raise RunDirectoryError(f"{path} is not valid JSON") from None
    if not isinstance(report, dict) or not {"overall", "groups", "gaps"} <= set(report):
        raise RunDirectoryError(f"{path} is not a fedfair-med report")
    return report


def read_model(run_dir: Path) -> dict[str, torch.Tensor]:
    """``model.pt``: the final global state dict."""
    return torch.load(Path(run_dir) / "model.pt")


def read_json(run_dir: Path, name: str) -> dict[str, Any] | None:
    """A JSON file the run wrote with :meth:`RunDirectory.write_json` (None when absent)."""
    path = Path(run_dir) / name
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
