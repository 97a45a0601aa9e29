"""Audit any trained model on one hospital's own data, per group, without sharing anything.

A hospital handed a model — the ``model.pt`` of a federated run, or weights trained elsewhere —
needs to know how it does on *its* patients (per sex, age band and their intersections) before
relying on it. :func:`audit_model` loads the weights into the task's network, reads the
hospital's site manifest through the task (the same evaluation transforms as a federated round),
scores every sample of the chosen split and writes ``predictions.csv``, ``report.json``,
``report.md`` and ``report.html`` into a local folder. Nothing leaves the machine.

It builds a task and a network, so it lives on the runtime floor, not in reporting. Per-sample
scoring is the site runtime's own loop (:func:`predict_like_a_round`, ``SiteRunner.predict``), so
an audit scores a model exactly like the evaluation of a round. The numbers are those of
:func:`~fedfair_med.reporting.run_report.build_run_report`: group means of the per-sample metric with
95 % bootstrap intervals, and the EA / DP / EO gaps.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch
import yaml
from torch import nn

from fedfair_med.config import RunConfig
from fedfair_med.data.federation import SiteData
from fedfair_med.data.manifest import SPLITS, ManifestError, load_manifest
from fedfair_med.reporting.run_report import build_run_report
from fedfair_med.reporting.render import render_html, render_markdown
from fedfair_med.runtime.setup import RunSetup
from fedfair_med.runtime.site import SiteRunner
from fedfair_med.tasks import TASKS, build_task
from fedfair_med.tasks.base import Task
from fedfair_med.tasks.imaging import ImagingTask

__all__ = [
    "AuditError",
    "AuditResult",
    "Predictor",
    "predict_like_a_round",
    "read_run_settings",
    "load_state_dict",
    "build_audited_model",
    "load_audit_site",
    "audit_model",
    "default_out_dir",
]

#: ``predict(task, site, model)`` → one row per sample of ``site.test`` (SiteRunner.predict's columns).
Predictor = Callable[[Task, SiteData, nn.Module], pd.DataFrame]

#: ``data`` options of a run that describe the training federation, not how an image is read.
#: ``prevalence_correction`` is a participating site's deployment choice (its training prevalence):
#: an audit scores the model's own logits.
_TRAINING_ONLY_OPTIONS = ("manifests", "cache", "class_weights", "prevalence_correction")


class AuditError(ValueError):
    """A problem the user can fix (wrong file, network or split); the message says which."""


@dataclass
class AuditResult:
    """Where the audit wrote its files, and what it found."""

    out_dir: Path
    paths: dict[str, Path]
    report: dict[str, Any]
    predictions: pd.DataFrame


def default_out_dir(weights: str | Path, manifest: str | Path) -> Path:
    """``audit-<model's run>-<site>``: importers name every manifest manifest.csv, so the site is
    its folder's name, and the model's run keeps audits of different models apart."""
    manifest, weights = Path(manifest), Path(weights)
    site = manifest.stem if manifest.stem != "manifest" else (manifest.resolve().parent.name or "site")
    run = weights.resolve().parent.name if weights.stem == "model" else weights.stem
    return Path(f"audit-{run}-{site}")


def predict_like_a_round(task: Task, site: SiteData, model: nn.Module) -> pd.DataFrame:
    """Score ``site.test`` with the site runtime's own evaluation loop (SiteRunner.predict)."""
    runner = SiteRunner(RunSetup.create(RunConfig(task=task.name), task), site, 0, [site.name],
                        tuple(site.attributes))
    return runner.predict(model, model.state_dict())


# ---- the run the model came from --------------------------------------------------------------
def read_run_settings(run_yaml: str | Path) -> dict[str, Any]:
    """``task``, ``method``, ``network``, ``network_kwargs``, ``data`` and ``age_edges`` of a run.yaml.

    Only what rebuilds the network and reads images the way training did is kept; ``data``
    loses the options that describe the training federation (its manifests, caching, class
    weights).
    """
    path = Path(run_yaml)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AuditError(f"run configuration {path} does not exist") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise AuditError(f"{path} is not a readable run.yaml ({type(err).__name__})") from None
    if not isinstance(raw, dict):
        raise AuditError(f"{path} must hold a mapping (a run directory's run.yaml)")
    kwargs = raw.get("network_kwargs") or {}
    data = raw.get("data") or {}
    if not isinstance(kwargs, dict) or not isinstance(data, dict):
        raise AuditError(f"{path}: network_kwargs and data must be mappings")
    settings: dict[str, Any] = {
        "task": raw.get("task"),
        "method": raw.get("method"),
        "network": raw.get("network"),
        "network_kwargs": dict(kwargs),
        "data": {k: v for k, v in data.items() if k not in _TRAINING_ONLY_OPTIONS},
    }
    if raw.get("age_edges"):
        settings["age_edges"] = [float(e) for e in raw["age_edges"]]
    return settings


# ---- the model ------------------------------------------------------------------------------------
def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved state dict (as a run directory's ``model.pt``), read safely.

    ``weights_only=True``: a weights file from elsewhere is data, never code to execute.
    A checkpoint that wraps the weights under ``state_dict`` / ``model_state_dict`` is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"model file {path} does not exist" if not path.exists()
                         else f"model {path} is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise AuditError(f"{path} is not a PyTorch state dict ({reason[:160]})") from None
    if isinstance(state, Mapping):
        for key in ("state_dict", "model_state_dict"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise AuditError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(state)


def _examples(names: Sequence[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def build_audited_model(task: Task, weights: str | Path, network: str | None = None,
                        network_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """The task's network (``network`` or the task default) with the weights loaded, in eval mode.

    Every tensor must match by name and shape (strict): a partly loaded network would audit a
    model nobody trained. A mismatch is one :class:`AuditError` naming what differs.
    """
    state = load_state_dict(weights)
    name = network or task.defaults.network
    try:
        model = task.build_model(network, **dict(network_kwargs or {}))
    except (ValueError, TypeError) as err:
        raise AuditError(f"cannot build network {name!r} for task {task.name!r}: {err}") from None
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [f"{k} (file {tuple(state[k].shape)}, network {tuple(own[k].shape)})"
                for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing from the file, e.g. {_examples(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} not in the network, e.g. {_examples(unexpected)}")
        if reshaped:
            parts.append(f"{len(reshaped)} of another shape, e.g. {_examples(reshaped)}")
        raise AuditError(
            f"{weights} does not match network {name!r} of task {task.name!r}: {'; '.join(parts)}."
            " Name the network it was trained with (--network, or --run-yaml RUN/run.yaml)"
        )
    model.load_state_dict(state, strict=True)
    return model.eval()


# ---- the hospital's data ---------------------------------------------------------------------------
def _manifest_tasks() -> list[str]:
    return sorted(name for name, cls in TASKS.items() if issubclass(cls, ImagingTask))


def load_audit_site(task: Task, manifest: str | Path, *, split: str = "test",
                    age_edges: Sequence[float] = (60,),
                    data_options: Mapping[str, Any] | None = None) -> SiteData:
    """The site of ``manifest`` with the audited split, under evaluation transforms, as ``test``.

    A full site manifest (train and test rows) goes through the task's ``load_federation``,
    exactly as in training. A manifest written only for an audit (say every row ``test``) is
    not a training site, so its rows are turned into samples by the same task methods
    ``load_federation`` uses (records, evaluation transforms) instead of being refused.
    """
    if not isinstance(task, ImagingTask):
        raise AuditError(f"task {task.name!r} has no site manifests; audit one of "
                         f"{', '.join(_manifest_tasks())}")
    path = Path(manifest)
    if not path.exists():
        raise AuditError(f"manifest {path} does not exist")
    key = split.strip().lower()
    if key not in SPLITS:
        raise AuditError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    try:
        parsed = load_manifest(path)
    except ManifestError as err:
        raise AuditError(f"manifest {path} cannot be used:\n{err}") from None
    rows = parsed.split(key)
    if not rows:
        present = sorted({row.split for row in parsed.rows})
        raise AuditError(f"{path} has no {key!r} rows (splits present: {', '.join(present) or 'none'});"
                         " choose one with --split")
    edges = tuple(float(e) for e in age_edges)
    options = dict(data_options or {})
    full_site = bool(parsed.split("train")) and bool(parsed.split("test"))
    if full_site and key != "train":
        federation = task.load_federation(manifests=[path], age_edges=edges, **options)
        site = federation.sites[0]
        audited = site.test if key == "test" else site.val
        return SiteData(site.name, site.train, audited, None, attributes=site.attributes)
    # Training rows (when audited) are read without augmentation, like every evaluated split.
    task.configure(**options)
    records = [task.record(row, parsed, edges) for row in rows]
    audited = task.split_dataset(records, train=False, seed=0, cache=False)
    return SiteData(parsed.site, [], audited, None,  # type: ignore[arg-type]
                    attributes=task.site_attributes(parsed))


# ---- the audit ---------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _chosen_attributes(requested: Sequence[str] | None, available: Sequence[str],
                       manifest: Path) -> list[str]:
    """The requested attributes (all of the manifest's when none), checked against the manifest."""
    if not requested:
        return list(available)
    unknown = [a for a in requested if a not in available and a != "site"]
    if unknown:
        raise AuditError(f"attribute(s) {unknown} are not columns of {manifest}; its attributes are "
                         f"{', '.join(available) or 'none'}")
    return [a for a in requested if a != "site"]


def audit_model(
    *,
    task: str,
    weights: str | Path,
    manifest: str | Path,
    predict: Predictor = predict_like_a_round,
    out_dir: str | Path | None = None,
    attributes: Sequence[str] | None = None,
    split: str = "test",
    age_edges: Sequence[float] = (60,),
    min_group_size: int = 10,
    network: str | None = None,
    network_kwargs: Mapping[str, Any] | None = None,
    data_options: Mapping[str, Any] | None = None,
    run_method: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> AuditResult:
    """Score ``weights`` on ``manifest``'s ``split`` and write the per-group fairness report.

    Groups are the site, each attribute (``age`` banded at ``age_edges``) and each pair of
    attributes; groups under ``min_group_size`` stay in the report, flagged and warned about.
    Besides EA over sites, ``gaps`` holds ``ea:<attr>`` for every audited attribute (and DP/EO
    for classification).
    Files land in ``out_dir`` (default :func:`default_out_dir`): ``predictions.csv``,
    ``report.json``, ``report.md``, ``report.html``.
    """
    try:
        audited_task = build_task(task)
    except ValueError as err:
        raise AuditError(str(err)) from None
    # Cheap checks first: no network is built for a typo.
    if not isinstance(audited_task, ImagingTask):
        raise AuditError(f"task {audited_task.name!r} has no site manifests; audit one of "
                         f"{', '.join(_manifest_tasks())}")
    if not Path(manifest).exists():
        raise AuditError(f"manifest {manifest} does not exist")
    edges = tuple(float(e) for e in age_edges)
    try:
        audited_task.apply_model_options(dict(data_options or {}))
    except ValueError as err:
        raise AuditError(str(err)) from None
    model = build_audited_model(audited_task, weights, network, network_kwargs)
    try:
        site = load_audit_site(audited_task, manifest, split=split, age_edges=edges,
                               data_options=data_options)
    except AuditError:
        raise
    except ValueError as err:  # the task's own checks: missing image, unknown label, bad option
        raise AuditError(str(err)) from None
    chosen = _chosen_attributes(attributes, site.attributes, Path(manifest))

    predictions = predict(audited_task, site, model)
    report = build_run_report(
        predictions, kind=audited_task.kind, attributes=chosen,
        primary_metric=audited_task.primary_metric, age_edges=edges,
        min_group_size=min_group_size, n_boot=n_boot, seed=seed,
        attribute_gaps=True,  # a one-site audit's site gap is 0: the attributes are the question
    )

    out = Path(out_dir) if out_dir is not None else default_out_dir(weights, manifest)
    out.mkdir(parents=True, exist_ok=True)
    weights_path = Path(weights)
    config: dict[str, Any] = {"task": audited_task.name}
    if run_method:
        config["method"] = run_method
    config["audit"] = {
        "model": str(weights_path),
        "model_sha256": _sha256(weights_path),
        "network": network or audited_task.defaults.network,
        "network_kwargs": dict(network_kwargs or {}),
        "manifest": str(manifest),
        "site": site.name,
        "split": split.strip().lower(),
        "samples": int(len(predictions)),
        "attributes": chosen,
        "age_edges": list(edges),
        "min_group_size": int(min_group_size),
    }
    if data_options:
        config["audit"]["data"] = dict(data_options)
    paths = {
        "predictions": out / "predictions.csv",
        "json": out / "report.json",
        "markdown": out / "report.md",
        "html": out / "report.html",
    }
    predictions.to_csv(paths["predictions"], index=False)
    paths["json"].write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    paths["markdown"].write_text(render_markdown(report, config, []), encoding="utf-8")
    paths["html"].write_text(render_html(report, config, []), encoding="utf-8")
    return AuditResult(out_dir=out, paths=paths, report=report, predictions=predictions)
