"""Run configuration: one YAML file (or CLI flags) fully resolves to a :class:`RunConfig`.

The resolved configuration is written to every run directory as ``run.yaml`` so a run can be
reproduced from it alone. Validation happens here, before anything starts, with one clear
message per problem.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message says which key and why."""


@dataclass
class RunConfig:
    """Everything that determines a run's numbers (same config + seed ⇒ same metrics)."""

    name: str = "run"
    task: str = "synthetic-seg"
    method: str = "fedavg"
    method_params: dict[str, Any] = field(default_factory=dict)
    criterion: str = "ea"
    attribute: str = "site"
    seed: int = 0
    rounds: int | None = None
    epochs: int | None = None
    lr: float | None = None
    #: Cosine-decay the local learning rate over the rounds, from ``lr`` to this; null: constant.
    lr_final: float | None = None
    optimizer: str | None = None
    momentum: float | None = None
    #: Each site's optimiser state across rounds: reset (fresh every round) or keep (resumed).
    optimizer_state: str = "reset"
    batch_size: int | None = None
    max_steps: int | None = None
    network: str | None = None
    network_kwargs: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    attributes: list[str] | None = None
    age_edges: list[float] = field(default_factory=lambda: [60.0])
    runtime: str = "local"
    #: Differential privacy (see docs/privacy.md); empty = off, the run's numbers are unchanged.
    privacy: dict[str, Any] = field(default_factory=dict)
    #: Evaluate every N rounds (the last round always): evaluation can cost more than training.
    eval_every: int = 1
    #: Where each site trains: auto (CUDA if present), cpu, cuda, cuda:N (docs/configuration.md).
    device: str = "auto"
    #: Forward-pass precision at the sites: 32, bf16 or fp16 (losses and sums stay float32/64).
    precision: str = "32"
    #: torch's deterministic algorithms on a GPU (slower; CPU runs are deterministic anyway).
    deterministic: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "RunConfig":
        from fedfair_med.algorithms import REGISTRY
        from fedfair_med.fairness.criteria import Criterion
        from fedfair_med.tasks import TASKS

        problems = self._type_problems()
        if problems:  # the checks below assume the declared types
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
        if self.task not in TASKS:
            problems.append(f"task: unknown task {self.task!r}; choose one of {sorted(TASKS)}")
        if self.method not in REGISTRY:
            problems.append(f"method: unknown method {self.method!r}; choose one of {sorted(REGISTRY)}")
        for key in ("rounds", "epochs", "batch_size", "max_steps", "eval_every"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                problems.append(f"{key}: must be a positive integer, got {value!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0):
            problems.append(f"lr: must be a positive number, got {self.lr!r}")
        if self.lr_final is not None and not (isinstance(self.lr_final, (int, float)) and self.lr_final >= 0):
            problems.append(f"lr_final: must be a number ≥ 0 (or null for a constant rate), got {self.lr_final!r}")
        if self.momentum is not None and not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            problems.append(f"momentum: must be in [0, 1), got {self.momentum!r}")
        if self.optimizer is not None and self.optimizer not in ("adam", "sgd"):
            problems.append(f"optimizer: use 'adam' or 'sgd', got {self.optimizer!r}")
        if self.optimizer_state not in ("reset", "keep"):
            problems.append(f"optimizer_state: use 'reset' (a fresh optimiser every round) or "
                            f"'keep' (each site resumes its own), got {self.optimizer_state!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            problems.append(f"seed: must be an integer, got {self.seed!r}")
        try:
            Criterion(self.criterion, self.attribute)
        except ValueError as err:
            problems.append(f"criterion: {err}")
        problems.extend(self._privacy_problems(REGISTRY))
        if self.task in TASKS:
            problems.extend(self._task_problems())
        problems.extend(self._device_problems())
        if (self.optimizer_state == "keep" and self.method in REGISTRY
                and not REGISTRY[self.method].allows_kept_optimizer_state):
            problems.append(f"optimizer_state: {self.method} needs a fresh optimiser every round "
                            "(its algebra assumes the local state starts at zero); use 'reset'")
        if not problems and self.method in REGISTRY:
            try:
                REGISTRY[self.method](**self.method_params)
            except (ValueError, TypeError) as err:
                problems.append(f"method_params: {err}")
        if problems:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
        return self

    def _type_problems(self) -> list[str]:
        """Each key has its declared type (YAML can give any value; say which key is wrong)."""
        def number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        def integer(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        checks = {
            "name": (str, False), "task": (str, False), "method": (str, False),
            "criterion": (str, False), "attribute": (str, False), "runtime": (str, False),
            "method_params": (dict, False), "network_kwargs": (dict, False), "data": (dict, False),
            "privacy": (dict, False), "optimizer": (str, True), "optimizer_state": (str, False), "network": (str, True),
        }
        problems = []
        for key, (kind, optional) in checks.items():
            value = getattr(self, key)
            if not (isinstance(value, kind) or (optional and value is None)):
                problems.append(f"{key}: must be a {kind.__name__}{' or null' if optional else ''}, "
                                f"got {value!r}")
            elif kind is dict and not all(isinstance(k, str) for k in value):
                problems.append(f"{key}: keys must be strings, got {sorted(map(repr, value))}")
        for key in ("rounds", "epochs", "batch_size", "max_steps", "eval_every"):
            value = getattr(self, key)
            if value is not None and not integer(value):
                problems.append(f"{key}: must be an integer, got {value!r}")
        if not integer(self.seed):
            problems.append(f"seed: must be an integer, got {self.seed!r}")
        for key in ("lr", "lr_final", "momentum"):
            value = getattr(self, key)
            if value is not None and not number(value):
                problems.append(f"{key}: must be a number, got {value!r}")
            elif value is not None and not math.isfinite(value):  # .inf / .nan in YAML
                problems.append(f"{key}: must be a finite number, got {value!r}")
        if self.attributes is not None and not (isinstance(self.attributes, list)
                                                and all(isinstance(a, str) for a in self.attributes)):
            problems.append(f"attributes: must be a list of names, got {self.attributes!r}")
        if not (isinstance(self.age_edges, list) and self.age_edges
                and all(number(e) and math.isfinite(e) for e in self.age_edges)):
            problems.append(f"age_edges: must be a non-empty list of finite numbers, got {self.age_edges!r}")
        return problems

    def _device_problems(self) -> list[str]:
        """``device`` and ``precision`` are well formed (whether they exist here is checked where
        a site starts: the aggregator's machine need not have the sites' GPUs)."""
        problems = [p for p in (device_problem(self.device),) if p]
        precision = normalise_precision(self.precision)
        if precision is None:
            problems.append(f"precision: use 32, bf16 or fp16, got {self.precision!r}")
        else:
            self.precision = precision  # YAML's 32 is an int
            if precision != "32" and self.privacy.get("dp_sgd"):
                problems.append(f"precision {precision}: not with privacy.dp_sgd (Opacus computes "
                                "per-sample gradients in the parameters' dtype; autocast's "
                                "low-precision activations would change the clipped gradients "
                                "untested); use precision: 32")
        if not isinstance(self.deterministic, bool):
            problems.append(f"deterministic: must be true or false, got {self.deterministic!r}")
        return problems

    def _task_problems(self) -> list[str]:
        """``data`` holds options the task knows, with usable values, and the network (when one
        is chosen) builds and gives the task's output shape — said here, in one line each,
        instead of a TypeError in a data loader or a shape error from torch mid-round."""
        from fedfair_med.tasks import build_task

        task = build_task(self.task)
        problems = [f"data: {p}" for p in task.data_problems(self.data)]
        if problems or (self.network is None and not self.network_kwargs):
            return problems
        problem = _network_problem(self.task, self.network, _canonical(self.network_kwargs),
                                   _canonical(self.data))
        return [problem] if problem else []

    def _privacy_problems(self, registry: Mapping[str, Any]) -> list[str]:
        """The ``privacy`` option is valid and protects something this method actually shares."""
        from fedfair_med.privacy.settings import parse_privacy, privacy_problems

        problems = privacy_problems(self.privacy)
        if problems or self.method not in registry:
            return problems
        settings = parse_privacy(self.privacy)
        if settings.protects_statistics and not hasattr(registry[self.method], "statistics_privacy"):
            problems.append(f"privacy.statistics_epsilon: method {self.method!r} shares no group "
                            "statistics (only flexfair and fairfed do); use privacy.dp_sgd to "
                            "protect its model updates")
        if settings.dp_sgd is not None and self.method not in DP_SGD_METHODS:
            problems.append(f"privacy.dp_sgd: not supported for method {self.method!r} (its local "
                            "step changes gradients outside per-sample clipping, or mixes samples); "
                            f"use one of {list(DP_SGD_METHODS)}")
        if (settings.dp_sgd is not None and self.method == "flexfair"
                and (self.method_params or {}).get("penalty", "live") == "live"):
            problems.append("privacy.dp_sgd: flexfair's live penalty is a quadratic in batch means, "
                            "so one sample's gradient depends on the others in its batch and "
                            "per-sample clipping bounds nothing; use method_params: {penalty: linear} "
                            "(a mean of per-sample terms) with DP-SGD")
        return problems


#: ``device`` values: ``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda``, ``cuda:N``
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
PRECISIONS = ("32", "bf16", "fp16")


def device_problem(setting: Any) -> str | None:
    """Why ``setting`` is not a valid ``device`` value (syntax only), or None."""
    if not isinstance(setting, str) or not DEVICE_PATTERN.match(setting):
        return f"device: use auto, cpu, cuda or cuda:N, got {setting!r}"
    return None


def normalise_precision(value: Any) -> str | None:
    """``32``/``"32"``/``fp32`` → ``"32"``; ``bf16``/``fp16`` as they are; None when unknown."""
    text = str(value).strip().lower() if not isinstance(value, bool) else ""
    if text in ("32", "fp32", "float32"):
        return "32"
    return text if text in PRECISIONS else None


def _canonical(value: Mapping[str, Any]) -> str:
    import json

    return json.dumps(value, sort_keys=True, default=str)


@functools.lru_cache(maxsize=64)
def _network_problem(task_name: str, network: str | None, kwargs_json: str, data_json: str) -> str | None:
    """Why the chosen network does not fit the task, or None (one tiny forward pass, cached)."""
    import json

    import torch

    from fedfair_med.models import NETWORKS
    from fedfair_med.tasks import build_task
    from fedfair_med.contracts import SEGMENTATION

    task = build_task(task_name)
    name = network or task.defaults.network
    kwargs = json.loads(kwargs_json)
    if name not in NETWORKS:
        return f"network: unknown network {name!r}; choose one of {sorted(NETWORKS)}"
    channels = kwargs.get("channels")
    if channels is not None and (not isinstance(channels, list) or len(channels) < 2
                                 or not all(isinstance(c, int) and c > 0 for c in channels)):
        return (f"network_kwargs.channels: {name} needs a list of at least two positive channel "
                f"counts, one per level (e.g. [8, 16, 32]), got {channels!r}")
    shown = f"network {name}" + (f" with network_kwargs {kwargs}" if kwargs else "")
    try:
        task.apply_model_options(json.loads(data_json))
        model = task.build_model(network, **kwargs).eval()
        size = tuple(getattr(task, "image_size", task.defaults.image_size))
        with torch.no_grad():
            out = model(torch.zeros(1, task.in_channels, *size))
    except Exception as err:  # noqa: BLE001 - any failure of the builder is a configuration problem
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"{shown} does not work for task {task_name}: {detail}"
    logits = out[0] if isinstance(out, (tuple, list)) else out
    shape = tuple(getattr(logits, "shape", ()))
    if task.kind == SEGMENTATION:
        wanted = f"(1, 1, {', '.join(map(str, size))}) — a segmentation network"
        fits = len(shape) == 2 + len(size) and shape[1] == 1
    else:
        wanted = "(1, 2) — a classification network"
        fits = shape == (1, 2)
    if not fits:
        return (f"{shown}: its output has shape {shape}, but task {task_name} ({task.kind}) needs "
                f"{wanted}, e.g. {task.defaults.network} (the task's default)")
    return None


#: Methods whose local loss is a mean of per-sample terms, so DP-SGD's per-sample clipping covers it
#: (FedAvgM trains as FedAvg does; its server momentum is post-processing of the noisy updates).
DP_SGD_METHODS = ("fedavg", "fedavgm", "flexfair", "fairfed")


def load_config(source: str | Path | Mapping[str, Any], **overrides: Any) -> RunConfig:
    """Read a YAML file or mapping, apply non-None ``overrides``, validate."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such configuration file") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
    else:
        raw = dict(source)
    if not isinstance(raw, dict):
        raise ConfigError("configuration must be a mapping of keys to values")
    raw.pop("resolved", None)  # derived facts a run directory's run.yaml carries
    unknown_keys(raw)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_mapping(raw)


def unknown_keys(raw: Mapping[Any, Any]) -> None:
    """Refuse keys that are not RunConfig fields, by name (the docs promise misspelt keys are
    refused; the dataclass would say only "unexpected keyword argument")."""
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        raise ConfigError(f"unknown configuration key(s) {unknown}; known keys: {sorted(known)}")


def config_from_mapping(raw: Mapping[str, Any]) -> RunConfig:
    """A validated :class:`RunConfig` from a mapping (a run.yaml, a plan's run block)."""
    unknown_keys(raw)
    try:
        config = RunConfig(**raw)
    except TypeError as err:
        raise ConfigError(str(err)) from None
    return config.validate()


def dump_config(config: RunConfig, path: Path, **facts: Any) -> None:
    """Write the resolved configuration; ``facts`` (derived, read-only) go under ``resolved``."""
    content = config.to_dict()
    if facts:
        content["resolved"] = facts
    path.write_text(yaml.safe_dump(content, sort_keys=False))
