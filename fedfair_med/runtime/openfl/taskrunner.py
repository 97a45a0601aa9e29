"""Collaborator side of the OpenFL runtime: one hospital's :class:`SiteRunner` behind OpenFL's tasks.

:class:`SiteTaskRunner` is an OpenFL ``TaskRunner`` holding exactly one :class:`SiteRunner`. Its
three task functions receive the global model and the serialised server state (as the model's
tensor dict, see :mod:`~fedfair_med.runtime.openfl.wire`) and call the same code as the
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

from fedfair_med.runtime.openfl.schedule import EVALUATE, STATISTICS, TRAIN
from fedfair_med.runtime.openfl.spec import FederationSpec, bootstrap_replicates
from fedfair_med.runtime.openfl.timing import RoundTiming
from fedfair_med.runtime.openfl.wire import (
    EXTRA_PREFIX, EXTRA_TAG, MODEL_TAG, NUM_SAMPLES, SERVER_STATE, SUMMARY_PREFIX, SUMMARY_TAG,
    TRAINED_TAG, summary_to_tables, to_numpy, to_torch, unpack_state, MODEL_BLOB, PACKED,
    ModelLayout, pack_arrays, unpack_arrays, BOOTSTRAP_PREFIX,
)
from fedfair_med.runtime.openfl import secure
from fedfair_med.runtime.openfl.secure import make_party, mask_update, split_public_keys
from fedfair_med.runtime.malloc_tuning import keep_freed_memory
from fedfair_med.runtime.setup import RunSetup
from fedfair_med.runtime.site import SiteRunner
from fedfair_med.tasks.skin import PREVALENCE_NEEDS_A_NUMBER, prevalence_from_all_sites

logger = logging.getLogger(__name__)

SYNTHETIC_TASKS = ("synthetic-seg", "synthetic-cls")


def load_site(setup: RunSetup, spec: FederationSpec, site: str, manifest: str | Path | None = None,
              device: str | None = None) -> SiteRunner:
    """This hospital's SiteRunner: its site of the seeded synthetic federation, or its manifest.

    ``device`` (``collaborator start --device``) overrides the plan's: each hospital has its own
    hardware."""
    config, task = setup.config, setup.task
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
        if prevalence_from_all_sites(options):
            raise ValueError(PREVALENCE_NEEDS_A_NUMBER)
        federation = task.load_federation(seed=config.seed, manifests=[str(manifest)], **options)
        data = federation.sites[0]
    return SiteRunner(setup, data, index, spec.group_vocabulary, tuple(spec.attributes),
                      device=device)


class SiteTaskRunner(TaskRunner):
    """An OpenFL task runner wrapping one SiteRunner and the method's client hooks."""

    def __init__(self, spec: Mapping[str, Any], site: str, manifest: str | None = None,
                 out_dir: str | Path = ".", progress: Callable[[str, int, dict[str, Any]], None] | None = None,
                 data_loader: Any = None, bundle: str | Path | None = None,
                 device: str | None = None, **kwargs: Any) -> None:
        super().__init__(data_loader=data_loader, **kwargs)
        keep_freed_memory()
        self.spec = FederationSpec.from_settings(spec)
        self.spec_settings = dict(spec)
        # the simulation's set-up: e.g. this site noises its statistics exactly as there
        self.setup = RunSetup.create(self.spec.config())
        self.config, self.algorithm = self.setup.config, self.setup.algorithm
        self.site_runner = load_site(self.setup, self.spec, site, manifest, device=device)
        self.model = self.setup.build_model()
        self.layout = ModelLayout(self.model.state_dict())
        self.model_keys = self.layout.names
        self.out_dir = Path(out_dir)
        self.progress = progress
        #: the site's bundle (its key-agreement key lives there under secure aggregation)
        self.bundle = Path(bundle) if bundle is not None else None

    # ---- what OpenFL asks a task runner --------------------------------------------------
    def get_required_tensorkeys_for_function(self, func_name: str, **kwargs: Any) -> list[TensorKey]:
        keys = [TensorKey(k, "GLOBAL", 0, False, (MODEL_TAG,)) for k in (MODEL_BLOB, SERVER_STATE)]
        if self.spec.schedule.secure:  # the masked round's relayed keys / the survivors
            wanted = {TRAIN: secure.RELAY, STATISTICS: secure.RELAY, "fedfair_secagg_unmask": secure.SURVIVORS}
            if func_name in wanted:
                keys.append(TensorKey(wanted[func_name], "GLOBAL", 0, False, (secure.SECAGG_TAG,)))
        return keys

    def initialize_tensorkeys_for_functions(self, with_opt_vars: bool = False) -> None:
        pass

    def get_tensor_dict(self, with_opt_vars: bool = False) -> dict[str, np.ndarray]:
        return {MODEL_BLOB: self.layout.pack(self.model.state_dict())}

    def set_tensor_dict(self, tensor_dict: Mapping[str, np.ndarray], with_opt_vars: bool = False) -> None:
        self.model.load_state_dict({k: to_torch(v) for k, v in self.layout.unpack(tensor_dict[MODEL_BLOB]).items()})

    def get_train_data_size(self) -> int:
        return len(self.site_runner.train_set)

    def get_valid_data_size(self) -> int:
        return len(self.site_runner.test_set)

    def set_optimizer_treatment(self, opt_treatment: str) -> None:
        self.opt_treatment = opt_treatment  # each round builds a fresh optimiser, as in simulation

    # ---- helpers ------------------------------------------------------------------------
    def _inputs(self, input_tensor_dict: Mapping[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        global_state = {k: to_torch(v) for k, v in self.layout.unpack(input_tensor_dict[MODEL_BLOB]).items()}
        server_state = unpack_state(input_tensor_dict[SERVER_STATE])
        self._received_server_state = server_state
        self._relay = input_tensor_dict.get(secure.RELAY)
        return global_state, split_public_keys(server_state)[1]

    def _masked(self, task: str, col_name: str, round_num: int, state: Mapping[str, torch.Tensor] | None,
                num_samples: int, extras: Mapping[str, Any]) -> tuple[dict, dict]:
        """Secure aggregation: masked n_s·θ_s and extras (uint64); n_s, loss, steps and integer
        step counters in the clear."""
        if self.bundle is None:
            raise ValueError("secure aggregation needs the site's bundle (its key-agreement key)")
        if self.spec.schedule.secure:  # this round's keys, relayed (drop-out tolerant)
            keys = getattr(self, "_round_keys", {}).get(round_num)
            publics, _ = secure.read_relay(self._relay, self.site_runner.name)
            if keys is None or publics.get(self.site_runner.name) != keys.public:
                raise ValueError(f"secure aggregation: OpenFL round {round_num}: this site's round key "
                                 "is not in the relay (it arrived after the straggler timeout)")
            party = keys.party(publics)
        else:
            party = make_party(self.spec_settings, self.site_runner.name, self.bundle, self._received_server_state)
        masked, clear_state, clear = mask_update(party, round_num, task, state, num_samples, extras)
        secure.exit_if_told(self.site_runner.name, round_num)
        tensors: dict[tuple[str, str], np.ndarray] = {}
        for name, value in {**masked, **clear_state}.items():
            tensors[(name, TRAINED_TAG if state is not None and name in state else EXTRA_TAG)] = value
        tensors.update(self._next_model_slot())
        for name, value in clear.items():
            tensors[(EXTRA_PREFIX + name, EXTRA_TAG)] = value
        tensors[(NUM_SAMPLES, EXTRA_TAG)] = np.array(num_samples, dtype=np.int64)
        return self._outputs(task, col_name, round_num, tensors)

    def _outputs(self, task: str, col_name: str, round_num: int,
                 tensors: Mapping[tuple[str, str], np.ndarray]) -> tuple[dict, dict]:
        """At most three wire tensors per task: the model (or an empty placeholder) and the
        server-state placeholder when the task fills the next model's slot, and everything else
        packed into one (see wire's "Names on the wire")."""
        tensors = {key: np.asarray(value) for key, value in tensors.items()}
        model = {name: v for (name, tag), v in tensors.items()
                 if tag == TRAINED_TAG and name in self.layout.names}
        plain = all(name in model and model[name].size and model[name].dtype == dtype
                    for name, dtype, _ in self.layout.entries)  # else masked (uint64) or absent
        wire: dict[tuple[str, str], np.ndarray] = {}
        if (SERVER_STATE, TRAINED_TAG) in tensors:  # a task that fills the next model's slot
            wire[(MODEL_BLOB, TRAINED_TAG)] = self.layout.pack(model) if plain else np.zeros(0, np.uint8)
            wire[(SERVER_STATE, TRAINED_TAG)] = tensors.pop((SERVER_STATE, TRAINED_TAG))
        rest = {key: v for key, v in tensors.items()
                if not (key[1] == TRAINED_TAG and key[0] in self.layout.names and (plain or not v.size))}
        wire[(f"{PACKED}:{task}", EXTRA_TAG)] = pack_arrays(rest)  # one name per task: both
        # tasks of an OpenFL round send at once, and a shared name would overwrite the other
        out = {TensorKey(name, col_name, round_num, False, (tag,)): value
               for (name, tag), value in wire.items()}
        return out, {}

    def _notify(self, task: str, round_num: int, info: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress(task, round_num, info)

    @staticmethod
    def _next_model_slot() -> dict[tuple[str, str], np.ndarray]:
        """An empty server-state tensor: OpenFL then creates the next model's slot, which the
        server fills in itself (``_outputs`` adds the model placeholder beside it)."""
        return {(SERVER_STATE, TRAINED_TAG): np.zeros(0, dtype=np.uint8)}

    # ---- secure aggregation's key and unmasking steps (runtime/openfl/secure.py) -----------
    def fedfair_secagg_keys(self, col_name: str, round_num: int, input_tensor_dict: Mapping[str, np.ndarray],
                            **kwargs: Any) -> tuple[dict, dict]:
        """A fresh round key; its public half and encrypted shares go to the aggregator."""
        if self.bundle is None:
            raise ValueError("secure aggregation needs the site's bundle (its key-agreement key)")
        self._inputs(input_tensor_dict)
        keys = secure.make_round_keys(self.spec_settings, self.site_runner.name, self.bundle,
                                      self._received_server_state, round_num)
        self._round_keys = {round_num: keys}  # only this round's key is ever kept
        tensors = {(name, EXTRA_TAG): value for name, value in secure.keys_message(keys).items()}
        return self._outputs("fedfair_secagg_keys", col_name, round_num, tensors)

    def fedfair_secagg_unmask(self, col_name: str, round_num: int, input_tensor_dict: Mapping[str, np.ndarray],
                              **kwargs: Any) -> tuple[dict, dict]:
        """Reveal the shares this site holds of the dropped sites' round keys (none: no drop-out)."""
        decision = secure.read_decision(input_tensor_dict[secure.SURVIVORS])
        keys = getattr(self, "_round_keys", {}).pop(round_num, None)
        tensors: dict[tuple[str, str], np.ndarray] = {}
        if keys is not None and decision["dropped"] and self.site_runner.name in decision["survivors"]:
            _, to_me = secure.read_relay(self._relay, self.site_runner.name)
            for dropped, share in keys.reveal(decision["dropped"], to_me, decision["survivors"]).items():
                tensors[(secure.REVEAL_PREFIX + dropped, EXTRA_TAG)] = np.frombuffer(share, dtype=np.uint8).copy()
        return self._outputs("fedfair_secagg_unmask", col_name, round_num, tensors)

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
        secure.exit_if_told(self.site_runner.name, round_num)  # test-only drop-out, plain runs too
        # the model's tensors as they are: _outputs packs them into one copy
        tensors: dict[tuple[str, str], Any] = {(k, TRAINED_TAG): update.state[k] for k in self.model_keys}
        tensors.update(self._next_model_slot())
        for name, value in update.extras.items():
            tensors[(EXTRA_PREFIX + name, EXTRA_TAG)] = to_numpy(torch.as_tensor(value))
        tensors[(NUM_SAMPLES, EXTRA_TAG)] = np.array(update.num_samples, dtype=np.int64)
        self._notify(TRAIN, method_round, {"loss": float(update.extras["loss"])})
        return self._outputs(TRAIN, col_name, round_num, tensors)

    def fedfair_statistics(self, col_name: str, round_num: int,
                           input_tensor_dict: Mapping[str, np.ndarray], **kwargs: Any) -> tuple[dict, dict]:
        method_round = self.spec.schedule.statistics_round(round_num)
        global_state, server_state = self._inputs(input_tensor_dict)
        tensors = self._next_model_slot()
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
        if method_round == self.spec.schedule.rounds:  # once, after the final evaluation
            tensors.update(self._bootstrap_tables(predictions))
        overall = summary["overall"]
        self._notify(EVALUATE, method_round,
                     {"metric": overall["metric"] / overall["n"] if overall["n"] else float("nan")})
        return self._outputs(EVALUATE, col_name, round_num, tensors)


    def _bootstrap_tables(self, predictions: Any) -> dict[tuple[str, str], np.ndarray]:
        """This site's Poisson-bootstrap tables (fairness/bootstrap.py), [B, ..., 5] per table.

        The weights' stream is keyed by the plan's seed, the site's name and a secret kept in
        ``bootstrap.secret`` beside ``predictions.csv``, so the server cannot regenerate them."""
        import secrets as _secrets

        from fedfair_med.fairness.bootstrap import BootstrapPrivacy, site_replicates

        secret_file = self.out_dir / "bootstrap.secret"
        if not secret_file.exists():
            secret_file.write_text(_secrets.token_hex(32))
        site = self.site_runner.name
        tables = site_replicates(
            predictions, self.spec.vocabularies, site=site, seed=self.config.seed,
            replicates=bootstrap_replicates(self.spec_settings), secret=secret_file.read_text().strip(),
            privacy=BootstrapPrivacy.from_option(self.config.privacy, seed=self.config.seed, site=site))
        return {(BOOTSTRAP_PREFIX + name, SUMMARY_TAG): table for name, table in tables.items()}


class FedFairCollaborator(Collaborator):
    """OpenFL's collaborator with a short poll interval and a bound on the whole run."""

    def __init__(self, *args: Any, poll_interval_s: float = 0.2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.poll_interval_s = float(poll_interval_s)
        self.wire_log: list[dict[str, Any]] = []
        #: where this collaborator's time goes in the current OpenFL round (FEDFAIR_TIMING_LOG)
        self._timing = RoundTiming(self.collaborator_name)

    def _add_time(self, phase: str, started: float) -> None:
        self._timing.add(phase, time.perf_counter() - started)

    def _flush_timing(self, round_num: int) -> None:
        self._timing.fl_round = int(round_num)
        self._timing.write()
        self._timing = RoundTiming(self.collaborator_name)

    def get_data_for_tensorkey(self, tensor_key: Any) -> Any:
        started = time.perf_counter()
        try:
            if tensor_key.tensor_name in secure.SECAGG_WIRE:
                return self._poll_secagg(tensor_key)
            return super().get_data_for_tensorkey(tensor_key)
        finally:
            self._add_time("fetch_s", started)
            self._timing.add("fetched_tensors", 1)

    def _poll_secagg(self, tensor_key: Any) -> np.ndarray:
        """Secure aggregation's relayed keys / survivors: the aggregator answers an empty tensor
        until the step is decided, so ask again (20 ms, backing off to ``poll_interval_s``)."""
        waits = 0
        while True:
            value = self.get_aggregated_tensor_from_aggregator(tensor_key, require_lossless=True)
            if np.asarray(value).size:
                return value
            time.sleep(min(self.poll_interval_s, 0.02 * 1.5 ** waits))
            waits += 1

    def do_task(self, task: Any, round_number: int) -> dict:
        started = time.perf_counter()
        try:
            return super().do_task(task, round_number)
        finally:
            self._add_time("task_s", started)

    def send_task_results(self, tensor_dict: Mapping[Any, np.ndarray], round_number: int,
                          task_name: str) -> dict:
        """Record what is about to cross the wire (never the values), then send it.

        One ``kind: wire`` entry per tensor actually sent (its bytes are what the network
        carries) and one ``kind: content`` entry per tensor packed inside it (name, tags, shape,
        dtype), so an audit sees exactly what left the site.
        """
        base = {"site": self.collaborator_name, "task": task_name, "round": int(round_number)}
        entries = []
        for key, value in tensor_dict.items():
            array = np.asarray(value)
            entries.append({**base, "kind": "wire", "name": key.tensor_name, "tags": list(key.tags),
                            "shape": list(array.shape), "dtype": array.dtype.name})
            for name, tags, shape, dtype in self._contents(key, array):
                entries.append({**base, "kind": "content", "wire": key.tensor_name, "name": name,
                                "tags": tags, "shape": shape, "dtype": dtype})
        self.wire_log.extend(entries)
        path = os.environ.get("FEDFAIR_WIRE_LOG")
        if path:
            with open(path, "a") as fh:
                fh.writelines(json.dumps(e) + "\n" for e in entries)
        started = time.perf_counter()
        try:
            return super().send_task_results(tensor_dict, round_number, task_name)
        finally:
            self._add_time("send_s", started)

    def _contents(self, key: Any, array: np.ndarray) -> list[tuple[str, list[str], list[int], str]]:
        """(name, tags, shape, dtype) of each tensor a wire tensor carries."""
        if key.tensor_name == MODEL_BLOB:
            if not array.size:
                return []
            return [(name, list(key.tags), list(shape), dtype.name)
                    for name, dtype, shape in self.task_runner.layout.entries]
        if key.tensor_name.startswith(PACKED):
            return [(name, [tag], list(v.shape), v.dtype.name)
                    for (name, tag), v in unpack_arrays(array).items()]
        return [(key.tensor_name, list(key.tags), list(array.shape), array.dtype.name)]

    def run(self) -> None:
        self.callbacks.on_experiment_begin()
        empty_polls = 0
        while True:
            started = time.perf_counter()
            tasks, round_num, sleep_time, time_to_quit = self.client.get_tasks()
            self._add_time("get_tasks_s", started)
            if time_to_quit:
                break
            if not tasks:
                # The aggregator always says 10 s. Back off from 20 ms to poll_interval_s: a
                # round that ends just after this site finished is noticed within ~20 ms, a
                # long wait costs one small request per poll_interval_s.
                started = time.perf_counter()
                time.sleep(min(float(sleep_time), self.poll_interval_s, 0.02 * 1.5 ** empty_polls))
                self._add_time("idle_s", started)
                empty_polls += 1
                continue
            empty_polls = 0
            logger.info("Round %d: tasks %s", round_num, list(tasks))
            self.callbacks.on_round_begin(round_num)
            logs: dict[str, Any] = {}
            for task in tasks:
                logs.update(self.do_task(task, round_num))
            started = time.perf_counter()
            self.tensor_db.clean_up(self.db_store_rounds)
            self.callbacks.on_round_end(round_num, logs)
            self._add_time("bookkeeping_s", started)
            self._flush_timing(round_num)
        self.callbacks.on_experiment_end()
        logger.info("The aggregator says the federation is finished.")
