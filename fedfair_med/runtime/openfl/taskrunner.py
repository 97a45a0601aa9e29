"""Collaborator side of the OpenFL runtime: one hospital's :class:`SiteRunner` behind OpenFL's tasks.

:class:`SiteTaskRunner` is an OpenFL ``TaskRunner`` holding exactly one :class:`SiteRunner`. Its
three task functions receive the global model and the serialised server state (as the model's
tensor dict, see :mod:`~fedfair_med.runtime.openfl.protocol`) and call the same code as the
simulation, with the same seeds:

* ``fedfair_train`` — ``algorithm.broadcast`` then ``SiteRunner.train``; sends the new weights
  (tag ``trained``), the method's fixed-size extras and the sample count (tag ``fedfair_extra``);
* ``fedfair_statistics`` — the forward-only ``SiteRunner.statistics`` pass; sends its extras;
* ``fedfair_evaluate`` — ``SiteRunner.evaluate`` of the global model; ``predictions.csv`` is
  written *here*, only the fixed-size summary tables (tag ``fedfair_summary``) are sent.

Every tensor a site sends is recorded by :class:`FedFairCollaborator` (name, tags, shape, dtype —
never values); with ``FEDFAIR_WIRE_LOG=path`` set it is also appended to that file as JSON lines,
so a hospital (or a test) can audit exactly what left the site.

:class:`FedFairCollaborator` fixes OpenFL's polling: the aggregator tells an idle collaborator to
sleep 10 s through a call on the ``Aggregator`` base class that a subclass cannot override, so
half the rounds would wait ~10 s. Our collaborator caps that sleep at ``poll_interval_s``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from openfl.component.collaborator.collaborator import Collaborator
from openfl.federated.task.runner import TaskRunner
from openfl.utilities import TensorKey

from fedfair_med.algorithms import REGISTRY, build_algorithm
from fedfair_med.runtime.local import method_params
from fedfair_med.runtime.openfl.protocol import (
    EVALUATE, EXTRA_PREFIX, EXTRA_TAG, MODEL_TAG, NUM_SAMPLES, SERVER_STATE, STATISTICS,
    SUMMARY_PREFIX, SUMMARY_TAG, TRAIN, TRAINED_TAG, FederationSpec, summary_to_tables, to_numpy,
    to_torch, unpack_state,
)
from fedfair_med.runtime.openfl.secure import make_party, mask_update, split_public_keys
from fedfair_med.runtime.memory import keep_freed_memory
from fedfair_med.runtime.site import SiteRunner, build_global_model
from fedfair_med.tasks import build_task

logger = logging.getLogger(__name__)

SYNTHETIC_TASKS = ("synthetic-seg", "synthetic-cls")


def load_site(spec: FederationSpec, site: str, manifest: str | Path | None = None) -> SiteRunner:
    """This hospital's SiteRunner: its site of the seeded synthetic federation, or its manifest."""
    config = spec.config()
    task = build_task(config.task)
    if site not in spec.sites:
        raise ValueError(f"site {site!r} is not in this federation's plan (sites: {spec.sites})")
    index = spec.sites.index(site)
    if config.task in SYNTHETIC_TASKS:
        federation = task.load_federation(seed=config.seed, **config.data)
        by_name = {s.name: s for s in federation.sites}
        if site not in by_name:
            raise ValueError(f"the synthetic federation has no site {site!r} "
                             f"(it has {sorted(by_name)})")
        data, index = by_name[site], federation.site_names.index(site)
    else:
        if manifest is None:
            raise ValueError(f"task {config.task!r} needs this site's manifest (--manifest site.csv)")
        options = {k: v for k, v in config.data.items() if k != "manifests"}
        federation = task.load_federation(seed=config.seed, manifests=[str(manifest)], **options)
        data = federation.sites[0]
    return SiteRunner(task, data, index, config, spec.group_vocabulary, tuple(spec.attributes))


class SiteTaskRunner(TaskRunner):
    """An OpenFL task runner wrapping one SiteRunner and the method's client hooks."""

    def __init__(self, spec: Mapping[str, Any], site: str, manifest: str | None = None,
                 out_dir: str | Path = ".", progress: Callable[[str, int, dict[str, Any]], None] | None = None,
                 data_loader: Any = None, bundle: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(data_loader=data_loader, **kwargs)
        keep_freed_memory()
        self.spec = FederationSpec.from_settings(spec)
        self.spec_settings = dict(spec)
        self.config = self.spec.config()
        self.site_runner = load_site(self.spec, site, manifest)
        self.algorithm = build_algorithm(
            self.config.method, **method_params(self.config, REGISTRY[self.config.method]))
        self.model = build_global_model(self.config, self.site_runner.task)
        self.model_keys = list(self.model.state_dict())
        self.out_dir = Path(out_dir)
        self.progress = progress
        #: the site's bundle (its key-agreement key lives there under secure aggregation)
        self.bundle = Path(bundle) if bundle is not None else None
        #: (task, round, tensor name, tags, shape, dtype) of everything this site sent
        self.sent: list[tuple[str, int, str, tuple[str, ...], tuple[int, ...], str]] = []

    # ---- what OpenFL asks a task runner --------------------------------------------------
    def get_required_tensorkeys_for_function(self, func_name: str, **kwargs: Any) -> list[TensorKey]:
        return [TensorKey(k, "GLOBAL", 0, False, (MODEL_TAG,)) for k in [*self.model_keys, SERVER_STATE]]

    def initialize_tensorkeys_for_functions(self, with_opt_vars: bool = False) -> None:
        pass

    def get_tensor_dict(self, with_opt_vars: bool = False) -> dict[str, np.ndarray]:
        return {k: to_numpy(v) for k, v in self.model.state_dict().items()}

    def set_tensor_dict(self, tensor_dict: Mapping[str, np.ndarray], with_opt_vars: bool = False) -> None:
        self.model.load_state_dict({k: to_torch(tensor_dict[k]) for k in self.model_keys})

    def get_train_data_size(self) -> int:
        return len(self.site_runner.train_set)

    def get_valid_data_size(self) -> int:
        return len(self.site_runner.test_set)

    def set_optimizer_treatment(self, opt_treatment: str) -> None:
        self.opt_treatment = opt_treatment  # each round builds a fresh optimiser, as in simulation

    # ---- helpers ------------------------------------------------------------------------
    def _inputs(self, input_tensor_dict: Mapping[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        global_state = {k: to_torch(input_tensor_dict[k]) for k in self.model_keys}
        server_state = unpack_state(input_tensor_dict[SERVER_STATE])
        self._received_server_state = server_state
        return global_state, split_public_keys(server_state)[1]

    def _masked(self, task: str, col_name: str, round_num: int, state: Mapping[str, torch.Tensor] | None,
                num_samples: int, extras: Mapping[str, Any]) -> tuple[dict, dict]:
        """Secure aggregation: masked n_s·θ_s and extras (uint64); n_s, loss, steps and integer
        step counters in the clear."""
        if self.bundle is None:
            raise ValueError("secure aggregation needs the site's bundle (its key-agreement key)")
        party = make_party(self.spec_settings, self.site_runner.name, self.bundle, self._received_server_state)
        masked, clear_state, clear = mask_update(party, round_num, task, state, num_samples, extras)
        tensors: dict[tuple[str, str], np.ndarray] = {}
        for name, value in {**masked, **clear_state}.items():
            tensors[(name, TRAINED_TAG if state is not None and name in state else EXTRA_TAG)] = value
        if state is None:
            tensors.update(self._placeholders())
        else:
            tensors[(SERVER_STATE, TRAINED_TAG)] = np.zeros(0, dtype=np.uint8)
        for name, value in clear.items():
            tensors[(EXTRA_PREFIX + name, EXTRA_TAG)] = value
        tensors[(NUM_SAMPLES, EXTRA_TAG)] = np.array(num_samples, dtype=np.int64)
        return self._outputs(task, col_name, round_num, tensors)

    def _outputs(self, task: str, col_name: str, round_num: int,
                 tensors: Mapping[tuple[str, str], np.ndarray]) -> tuple[dict, dict]:
        out = {}
        for (name, tag), value in tensors.items():
            value = np.asarray(value)
            key = TensorKey(name, col_name, round_num, False, (tag,))
            out[key] = value
            self.sent.append((task, round_num, name, (tag,), tuple(value.shape), value.dtype.name))
        return out, {}

    def _notify(self, task: str, round_num: int, info: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress(task, round_num, info)

    def _placeholders(self) -> dict[tuple[str, str], np.ndarray]:
        """Empty tensors under every model name: the server fills in the next model itself."""
        empty = np.zeros(0, dtype=np.uint8)
        return {(k, TRAINED_TAG): empty for k in [*self.model_keys, SERVER_STATE]}

    # ---- the three tasks ----------------------------------------------------------------
    def fedfair_train(self, col_name: str, round_num: int, input_tensor_dict: Mapping[str, np.ndarray],
                      **kwargs: Any) -> tuple[dict, dict]:
        method_round = self.spec.schedule.train_round(round_num)
        global_state, server_state = self._inputs(input_tensor_dict)
        broadcast = self.algorithm.broadcast(server_state, self.site_runner.name)
        update = self.site_runner.train(self.algorithm, self.model, global_state, broadcast, method_round)
        if self.spec.secure_aggregation:
            self._notify(TRAIN, method_round, {"loss": float(update.extras["loss"])})
            return self._masked(TRAIN, col_name, round_num, update.state, update.num_samples, update.extras)
        tensors: dict[tuple[str, str], np.ndarray] = {
            (k, TRAINED_TAG): to_numpy(update.state[k]) for k in self.model_keys}
        tensors[(SERVER_STATE, TRAINED_TAG)] = np.zeros(0, dtype=np.uint8)
        for name, value in update.extras.items():
            tensors[(EXTRA_PREFIX + name, EXTRA_TAG)] = to_numpy(torch.as_tensor(value))
        tensors[(NUM_SAMPLES, EXTRA_TAG)] = np.array(update.num_samples, dtype=np.int64)
        self._notify(TRAIN, method_round, {"loss": float(update.extras["loss"])})
        return self._outputs(TRAIN, col_name, round_num, tensors)

    def fedfair_statistics(self, col_name: str, round_num: int,
                           input_tensor_dict: Mapping[str, np.ndarray], **kwargs: Any) -> tuple[dict, dict]:
        method_round = self.spec.schedule.statistics_round(round_num)
        global_state, server_state = self._inputs(input_tensor_dict)
        tensors = self._placeholders()
        if self.algorithm.wants_statistics(method_round, server_state):
            stats = self.site_runner.statistics(self.algorithm, self.model, global_state, method_round)
            if self.spec.secure_aggregation:
                self._notify(STATISTICS, method_round, {})
                return self._masked(STATISTICS, col_name, round_num, None, 0, stats)
            for name, value in stats.items():
                tensors[(EXTRA_PREFIX + name, EXTRA_TAG)] = to_numpy(torch.as_tensor(value))
        self._notify(STATISTICS, method_round, {})
        return self._outputs(STATISTICS, col_name, round_num, tensors)

    def fedfair_evaluate(self, col_name: str, round_num: int,
                         input_tensor_dict: Mapping[str, np.ndarray], **kwargs: Any) -> tuple[dict, dict]:
        method_round = self.spec.schedule.evaluated_round(round_num)
        global_state, _ = self._inputs(input_tensor_dict)
        predictions, summary = self.site_runner.evaluate(self.model, global_state)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        predictions.to_csv(self.out_dir / "predictions.csv", index=False)  # stays at the site
        tables = summary_to_tables(summary, self.spec.vocabularies)
        tensors = {(SUMMARY_PREFIX + name, SUMMARY_TAG): table for name, table in tables.items()}
        overall = summary["overall"]
        self._notify(EVALUATE, method_round,
                     {"metric": overall["metric"] / overall["n"] if overall["n"] else float("nan")})
        return self._outputs(EVALUATE, col_name, round_num, tensors)


class FedFairCollaborator(Collaborator):
    """OpenFL's collaborator with a short poll interval and a bound on the whole run."""

    def __init__(self, *args: Any, poll_interval_s: float = 0.2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.poll_interval_s = float(poll_interval_s)
        self.wire_log: list[dict[str, Any]] = []

    def send_task_results(self, tensor_dict: Mapping[Any, np.ndarray], round_number: int,
                          task_name: str) -> dict:
        """Record what is about to cross the wire (never the values), then send it."""
        entries = [{"site": self.collaborator_name, "task": task_name, "round": int(round_number),
                    "name": key.tensor_name, "tags": list(key.tags),
                    "shape": list(np.asarray(value).shape), "dtype": np.asarray(value).dtype.name}
                   for key, value in tensor_dict.items()]
        self.wire_log.extend(entries)
        path = os.environ.get("FEDFAIR_WIRE_LOG")
        if path:
            with open(path, "a") as fh:
                fh.writelines(json.dumps(e) + "\n" for e in entries)
        return super().send_task_results(tensor_dict, round_number, task_name)

    def run(self) -> None:
        self.callbacks.on_experiment_begin()
        while True:
            tasks, round_num, sleep_time, time_to_quit = self.client.get_tasks()
            if time_to_quit:
                break
            if not tasks:
                # the aggregator always says 10 s; a tiny model's round takes ~1 s
                time.sleep(min(float(sleep_time), self.poll_interval_s))
                continue
            logger.info("Round %d: tasks %s", round_num, list(tasks))
            self.callbacks.on_round_begin(round_num)
            logs: dict[str, Any] = {}
            for task in tasks:
                logs.update(self.do_task(task, round_num))
            self.tensor_db.clean_up(self.db_store_rounds)
            self.callbacks.on_round_end(round_num, logs)
        self.callbacks.on_experiment_end()
        logger.info("The aggregator says the federation is finished.")
