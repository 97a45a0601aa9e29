"""Server side of the OpenFL runtime: the method's server hook as an OpenFL aggregation function.

OpenFL 1.9 aggregates tensor by tensor (``AggregationFunction.call(local_tensors, db, name, round,
tags)``); our methods aggregate whole state dicts through the one server path
(``Algorithm.start_aggregation`` → ``add`` per site → ``result``, as the simulation does).
:class:`MethodAggregation` bridges the two. It is *privileged* (OpenFL hands it
the aggregator's whole tensor table), so the first ``trained`` tensor requested in a round
rebuilds every reporting site's :class:`ClientUpdate` (model tensors, ``extra/*`` tensors, the
``extra/__num_samples__`` weight), reads the round's global model and the serialised server state
from the table, calls the method once — that server path after a training phase, ``absorb_statistics``
after a statistics phase — caches the result for the round and returns the requested tensor. The
new server state is returned under :data:`SERVER_STATE`, so OpenFL stores it with the next model
and collaborators receive it with the weights. Every other tensor (extras, summaries) is summed.

:class:`FedFairAggregator` adds what OpenFL lacks around that: it writes the same run directory as
the simulation (``run.yaml``, ``metrics.jsonl`` from the sites' evaluation summaries combined with
:func:`combine_summaries`, ``model.pt`` with the *final* aggregate — ``save/last.pbuf`` holds the
model that entered the last round — and ``report.json``), records which sites dropped out of
a round under the plan's straggler policy, and checkpoints after every round (``save/resume.pbuf``
+ ``resume.json``) so that ``aggregator start --resume`` can continue an interrupted run.

Under secure aggregation (:mod:`~fedfair_med.runtime.openfl.secure`) the sites' tensors are
masked; :meth:`MethodAggregation._aggregate_secure_round` decodes only their sums over all sites
and calls the method on that single pseudo-update.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
from openfl.component.aggregator.aggregator import Aggregator
from openfl.interface.aggregation_functions.core.interface import AggregationFunction
from openfl.utilities import TensorKey

from fedfair_med.contracts import CLASSIFICATION, ClientUpdate, StateDict
from fedfair_med.fairness.bootstrap import BootstrapPrivacy, combine_replicates
from fedfair_med.runtime.openfl.spec import FederationSpec, bootstrap_replicates
from fedfair_med.runtime.openfl.timing import RoundTiming
from fedfair_med.runtime.openfl.wire import (
    EXTRA_PREFIX, EXTRA_TAG, MODEL_TAG, NUM_SAMPLES, SERVER_STATE, SUMMARY_PREFIX, SUMMARY_TAG,
    TRAINED_TAG, LosslessPipeline, pack_state, tables_to_summary, to_torch, unpack_state,
    MODEL_BLOB, ModelLayout, expand_packed, BOOTSTRAP_PREFIX,
)
from fedfair_med.runtime.openfl import secure
from fedfair_med.runtime.openfl.schedule import SECAGG_KEYS, STATISTICS, TRAIN
from fedfair_med.runtime.openfl.wire import PACKED, unpack_arrays
from fedfair_med.runtime.openfl.secure import PSEUDO_SITE, PUBLIC_KEY_PREFIX, split_public_keys, summed_update
from fedfair_med.reporting.run_report import build_run_report, json_safe
from fedfair_med.runtime.rundir import round_record, write_reports
from fedfair_med.runtime.malloc_tuning import keep_freed_memory
from fedfair_med.runtime.setup import RunSetup, derive_seed

logger = logging.getLogger(__name__)


Rows = Mapping[tuple[str, frozenset], np.ndarray]


def _round_rows(table: pd.DataFrame, fl_round: int, layout: ModelLayout) -> dict[tuple[str, frozenset], np.ndarray]:
    """{(tensor name, set of tags): value} for one round of the aggregator's tensor table, with
    the packed model and packed task outputs unpacked (:func:`expand_packed`).

    OpenFL keeps tags sorted (``('site-a', 'trained')``), so they are compared as sets.
    """
    rows = table[table["round"] == fl_round]
    return expand_packed({(str(n), frozenset(t)): np.asarray(v)
                          for n, t, v in zip(rows["tensor_name"], rows["tags"], rows["nparray"])}, layout)


def site_tensors(rows: Rows, tag: str, site: str,
                 prefix: str) -> dict[str, np.ndarray]:
    """A site's tensors with ``tag`` whose names start with ``prefix`` (prefix removed)."""
    return {name[len(prefix):]: value for (name, tags), value in rows.items()
            if tags == frozenset((tag, site)) and name.startswith(prefix)}


#: Files of the aggregator's checkpoint (in the workspace's ``save/``), rewritten after each round.
CHECKPOINT_MODEL, CHECKPOINT_STATE = "resume.pbuf", "resume.json"


class MethodAggregation(AggregationFunction):
    """Calls the method's server hook once per round and serves its result tensor by tensor."""

    def __init__(self, spec: Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__()
        self._privileged = True  # OpenFL passes the whole tensor table, not an iterator
        self.spec = FederationSpec.from_settings(spec)
        self.spec_settings = dict(spec)
        # the simulation's set-up: e.g. the server clamps the pooled noisy statistics the same way
        self.setup = RunSetup.create(self.spec.config())
        self.config, self.algorithm = self.setup.config, self.setup.algorithm
        self.layout = ModelLayout(self.setup.build_model().state_dict())
        self.model_keys = self.layout.names
        self._cache: dict[int, dict[str, np.ndarray]] = {}

    def call(self, local_tensors: list[Any], db_iterator: Any, tensor_name: str, fl_round: int,
             tags: tuple[str, ...]) -> np.ndarray:
        if TRAINED_TAG not in tags:
            # packed extras and summaries: the aggregator reads each site's values itself
            return np.zeros(0, dtype=np.uint8)
        if fl_round not in self._cache:
            sites = sorted(t.col_name for t in local_tensors)
            timing = RoundTiming("aggregation", fl_round)
            self._cache = {fl_round: self._aggregate_round(db_iterator, fl_round, sites)}
            timing.lap("method_aggregate_s")
            timing.write()
        return self._cache[fl_round][tensor_name]

    def _aggregate_round(self, table: pd.DataFrame, fl_round: int, sites: list[str]) -> dict[str, np.ndarray]:
        rows = _round_rows(table, fl_round, self.layout)
        global_state: StateDict = {k: to_torch(rows[(k, frozenset((MODEL_TAG,)))]) for k in self.model_keys}
        server_state = unpack_state(rows[(SERVER_STATE, frozenset((MODEL_TAG,)))])
        if self.spec.secure_aggregation:
            return self._aggregate_secure_round(rows, fl_round, sites, global_state, server_state)
        schedule = self.spec.schedule
        stats_round, train_round = schedule.statistics_round(fl_round), schedule.train_round(fl_round)
        if stats_round is not None:
            if self.algorithm.wants_statistics(stats_round, server_state):
                statistics = {s: {k: to_torch(v) for k, v in
                                  site_tensors(rows, EXTRA_TAG, s, EXTRA_PREFIX).items()}
                              for s in sites}
                server_state = self.algorithm.absorb_statistics(server_state, statistics)
            new_state = global_state
        elif train_round is not None:
            torch.manual_seed(derive_seed(self.config.seed, train_round, "server"))
            # the one server path, as in the simulation: each site's update folded in, in order
            aggregation = self.algorithm.start_aggregation(global_state, server_state)
            for s in sites:  # sorted
                extras = {k: to_torch(v) for k, v in site_tensors(rows, EXTRA_TAG, s, EXTRA_PREFIX).items()}
                num_samples = int(extras.pop(NUM_SAMPLES[len(EXTRA_PREFIX):]).item())
                state = {k: to_torch(rows[(k, frozenset((TRAINED_TAG, s)))]) for k in self.model_keys}
                aggregation.add(s, ClientUpdate(state=state, num_samples=num_samples, extras=extras))
            new_state, server_state = aggregation.result()
        else:
            raise RuntimeError(f"OpenFL round {fl_round} has no training or statistics phase")
        out = {MODEL_BLOB: self.layout.pack(new_state)}
        out[SERVER_STATE] = pack_state(server_state)
        return out


    def _aggregate_secure_round(self, rows: Rows, fl_round: int, sites: list[str],
                                global_state: StateDict, server_state: StateDict) -> dict[str, np.ndarray]:
        """Secure aggregation: decode only Σ over *all* sites, call the method on that one sum.

        A round in which a site did not report is refused (the masks would not cancel).
        """
        public_keys = {k: v for k, v in server_state.items() if k.startswith(PUBLIC_KEY_PREFIX)}
        _, server_state = split_public_keys(server_state)
        schedule = self.spec.schedule
        stats_round, train_round = schedule.statistics_round(fl_round), schedule.train_round(fl_round)

        def received(tag: str, s: str) -> dict[str, np.ndarray]:
            out = {name: value for (name, tags), value in rows.items() if tags == frozenset((tag, s))}
            return out

        counts = {s: int(np.asarray(received(EXTRA_TAG, s).get(NUM_SAMPLES, 0))) for s in sites}
        new_state = global_state
        decision_key = (secure.SURVIVORS, frozenset((secure.SECAGG_TAG,)))
        unmask: dict[str, Any] = {}
        if decision_key in rows:  # drop-out tolerant round: only the survivors' uploads count
            decision = secure.read_decision(rows[decision_key])
            sites = decision["survivors"]
            counts = {s: int(np.asarray(received(EXTRA_TAG, s).get(NUM_SAMPLES, 0))) for s in sites}
            revealed = {s: {n[len(secure.REVEAL_PREFIX):]: v for n, v in received(EXTRA_TAG, s).items()
                            if n.startswith(secure.REVEAL_PREFIX)} for s in sites}
            relay = rows[(secure.RELAY, frozenset((secure.SECAGG_TAG,)))]
            task = TRAIN if train_round is not None else STATISTICS
            unmask = {"unmasker": secure.round_unmasker(self.spec_settings, fl_round, relay, decision, revealed),
                      "label": f"{fl_round}|{task}"}
            if decision["dropped"]:
                logger.warning("secure aggregation, OpenFL round %d: removed the masks of dropped site(s) %s "
                               "with the survivors' key shares", fl_round, ", ".join(decision["dropped"]))
        expected = sites if unmask else self.spec.sites
        if stats_round is not None:
            if self.algorithm.wants_statistics(stats_round, server_state):
                by_site = {s: received(EXTRA_TAG, s) for s in sites}
                summed = summed_update(by_site, expected, None, counts, **unmask)
                server_state = self.algorithm.absorb_statistics(server_state, {PSEUDO_SITE: summed.extras})
        elif train_round is not None:
            by_site = {s: {**received(TRAINED_TAG, s), **received(EXTRA_TAG, s)} for s in sites}
            summed = summed_update(by_site, expected, global_state, counts, **unmask)
            torch.manual_seed(derive_seed(self.config.seed, train_round, "server"))
            aggregation = self.algorithm.start_aggregation(global_state, server_state)
            aggregation.add(PSEUDO_SITE, summed)  # the same path, fed the decoded sum as one site
            new_state, server_state = aggregation.result()
        else:
            raise RuntimeError(f"OpenFL round {fl_round} has no training or statistics phase")
        out = {MODEL_BLOB: self.layout.pack(new_state)}
        out[SERVER_STATE] = pack_state({**server_state, **public_keys})
        return out


class FedFairAggregator(Aggregator):
    """OpenFL's aggregator plus our run directory, final-model export and drop-out record."""

    def __init__(self, *args: Any, spec: Mapping[str, Any], run_dir: str = "run",
                 checkpoint_dir: str | None = None, plan_sha256: str = "",
                 resume_from: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        keep_freed_memory()
        self.spec = FederationSpec.from_settings(spec)
        self.spec_settings = dict(spec)
        self._bootstrap: dict[str, Any] | None = None
        self.setup = RunSetup.create(self.spec.config())
        self.config = self.setup.config
        #: the statistics' privacy budget, reported per round and in privacy.json
        self.ledger = self.setup.ledger
        self.classification = self.setup.task.kind == CLASSIFICATION
        self.layout = ModelLayout(self.setup.build_model().state_dict())
        self.model_keys = self.layout.names
        # Written beside run_dir and renamed into place when finished; an earlier finished run
        # there is kept as run.previous-N (see _finish), never overwritten file by file. The
        # resolved facts are the simulation's; the device is the plan's setting (each site
        # records where it computed in its own device.json).
        self.rundir = self.setup.run_directory(Path(run_dir), sites=self.spec.sites,
                                               attributes=self.spec.attributes,
                                               device=self.config.device, force=True)
        self.finished = False
        self.failure: str | None = None
        self._last_record: dict[str, Any] | None = None
        self.dropped: dict[int, list[str]] = {}
        self._train: dict[int, dict[str, float]] = {}
        self._started = time.perf_counter()
        self._records: list[dict[str, Any]] = []
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.plan_sha256 = plan_sha256
        if resume_from is not None:
            self._restore(Path(resume_from))

    def get_aggregated_tensor(self, tensor_name: str, round_number: int, report: bool, tags: Any,
                              require_lossless: bool, requested_by: str) -> Any:
        """Secure aggregation's relayed keys and survivors are decided here (empty: not yet)."""
        if tensor_name not in secure.SECAGG_WIRE:
            return super().get_aggregated_tensor(tensor_name, round_number, report, tags,
                                                 require_lossless, requested_by)
        key = TensorKey(tensor_name, self.uuid, int(round_number), False, (secure.SECAGG_TAG,))
        with self.lock:
            value = self.tensor_db.get_tensor_from_cache(key)
            if value is None and int(round_number) == self.round_number and not self.failure:
                try:
                    value = self._secagg_step(tensor_name, int(round_number))
                except secure.SecureSumError as err:
                    logger.error("%s", err)
                    self.failure = str(err)
                except Exception as err:  # never leave the sites polling for ever
                    logger.exception("secure aggregation step %s failed", tensor_name)
                    self.failure = f"secure aggregation: OpenFL round {round_number}: {type(err).__name__}: {err}"
                if value is not None:
                    self.tensor_db.cache_tensor({key: value})
        return self._nparray_to_named_tensor(key, value if value is not None else np.zeros(0, np.uint8),
                                             send_model_deltas=False, compress_lossless=True)

    def _secagg_step(self, name: str, k: int) -> np.ndarray | None:
        """Decide a masked round's key relay or survivors (:class:`~.secure.DropoutGate`)."""
        if not hasattr(self, "_secagg_gate"):
            self._secagg_gate = secure.DropoutGate(self.spec.sites, secure.threshold(self.spec_settings),
                                                   self.spec_settings.get("secure_cutoff_s"))
        table = self.tensor_db.tensor_db

        def sent(task: str, s: str) -> dict[str, np.ndarray]:
            rows = table[(table["round"] == k) & (table["tensor_name"] == f"{PACKED}:{task}")]
            for tags, value in zip(rows["tags"], rows["nparray"]):
                if s in tags:
                    return {n: v for (n, _), v in unpack_arrays(value).items()}
            return {}

        now = time.monotonic()
        if name == secure.RELAY:
            done = [s for s in self.authorized_cols if self._collaborator_task_completed(s, SECAGG_KEYS, k)]
            masking = self._secagg_gate.decide("sent their round keys", k, done, self.spec.sites, now,
                                               patient=True)
            return None if masking is None else secure.build_relay({s: sent(SECAGG_KEYS, s) for s in masking})
        relay = self.tensor_db.get_tensor_from_cache(
            TensorKey(secure.RELAY, self.uuid, k, False, (secure.SECAGG_TAG,)))
        if relay is None:
            return None
        masking = sorted(secure.read_relay(relay, "")[0])
        task = TRAIN if self.spec.schedule.train_round(k) is not None else STATISTICS
        done = [s for s in masking if self._collaborator_task_completed(s, task, k)]
        survivors = self._secagg_gate.decide("uploaded their masked update", k, done, masking, now)
        return None if survivors is None else secure.build_decision(masking, survivors)

    def _end_of_round_check(self) -> None:
        k = self.round_number
        if k >= len(self._end_of_round_check_done) or self._end_of_round_check_done[k]:
            return
        timing = RoundTiming("aggregator", k)
        done = sorted(self.collaborators_done)
        missing = sorted(set(self.authorized_cols) - set(done))
        rows = _round_rows(self.tensor_db.tensor_db, k, self.layout)
        final_model = ({name: rows[(name, frozenset((MODEL_TAG,)))] for name in self.model_keys}
                       if k == self.rounds_to_train - 1 else None)
        timing.lap("read_round_s")
        try:
            super()._end_of_round_check()  # OpenFL: aggregation (our function), metrics, model save
            timing.lap("openfl_end_of_round_s")
            self._record(k, done, missing, rows)
            timing.lap("record_s")
            if final_model is not None:
                self._finish(final_model)
            else:
                self._checkpoint(k + 1)
            timing.lap("checkpoint_s")
        except Exception as err:  # surfaced by run_aggregator, which stops the federation
            logger.exception("round %d failed", k)
            self.failure = f"OpenFL round {k} failed: {type(err).__name__}: {err}"
            raise
        timing.write()

    def _record(self, k: int, done: list[str], missing: list[str],
                rows: Rows) -> None:
        schedule = self.spec.schedule
        if missing:
            logger.warning("OpenFL round %d: site(s) %s dropped out of this round", k, ", ".join(missing))
        for method_round in (schedule.statistics_round(k), schedule.train_round(k)):
            if method_round is not None and missing:
                self.dropped.setdefault(method_round, [])
                self.dropped[method_round] = sorted(set(self.dropped[method_round]) | set(missing))
        train_round = schedule.train_round(k)
        if train_round is not None:
            self._train[train_round] = {
                s: float(site_tensors(rows, EXTRA_TAG, s, EXTRA_PREFIX)["loss"]) for s in done}
        evaluated = schedule.evaluated_round(k)
        if evaluated is None:
            return
        summaries = {s: tables_to_summary(site_tensors(rows, SUMMARY_TAG, s, SUMMARY_PREFIX),
                                          self.spec.vocabularies) for s in done}
        if evaluated == schedule.rounds:
            self._bootstrap = self._combine_bootstrap(rows, done)
        dropped = sorted(set(self.dropped.get(evaluated, [])) | set(missing))
        if dropped:
            self.dropped[evaluated] = dropped
        record = round_record(
            evaluated, elapsed_s=time.perf_counter() - self._started,
            train_loss=self._train.get(evaluated, {}), test=summaries,
            classification=self.classification, dropped=dropped,
            # the budget spent so far (DP-SGD is accounted per site)
            privacy=self.ledger.round_record(evaluated, {}) if self.ledger.statistics is not None else None)
        self.rundir.log_round(record)
        self._records.append(json_safe(record))
        self._last_record = record
        logger.info("round %d: metric %.4f", evaluated, record["metric"])

    def _combine_bootstrap(self, rows: Rows, done: list[str]) -> dict[str, Any] | None:
        """CIs from the sites' Poisson-bootstrap tables (fairness/bootstrap.py); None if none came."""
        tables = {s: site_tensors(rows, SUMMARY_TAG, s, BOOTSTRAP_PREFIX) for s in done}
        tables = {s: t for s, t in tables.items() if t}
        if not tables:
            return None
        accounting = BootstrapPrivacy.accounting(
            self.config.privacy, replicates=bootstrap_replicates(self.spec_settings),
            attributes=len(self.spec.vocabularies))
        out = combine_replicates(tables, self.spec.vocabularies, classification=self.classification,
                                 noisy=accounting is not None)
        out["seed"] = self.config.seed
        if accounting is not None:
            out["privacy"] = accounting
        return out

    def _finish(self, final_model: Mapping[str, np.ndarray]) -> None:
        self.rundir.save_model({k: to_torch(v) for k, v in final_model.items()})
        if self.ledger.statistics is not None:
            self.rundir.write_json("privacy.json", self.ledger.summary(self.spec.schedule.rounds, {}))
        self.rundir.write_json("federation.json", {
            "sites": self.spec.sites,
            "dropped": {str(r): s for r, s in sorted(self.dropped.items())},
            "openfl_rounds": self.rounds_to_train,
        })
        task = self.setup.task  # predictions stayed at the sites: their summaries and tables
        report = None if self._last_record is None else build_run_report(
            kind=task.kind, primary_metric=task.primary_metric, final_round=self._last_record,
            bootstrap=self._bootstrap, sites=self.spec.sites)
        try:
            write_reports(self.rundir.staging, report=report)
        except Exception as err:  # a report failure must not lose the finished run
            logger.warning("could not write the report: %s", err)
        had_run = self.rundir.path.exists()
        self.rundir.commit(keep_previous=True)
        if had_run:
            logger.warning("%s held an earlier run; it was kept as %s.previous-N",
                           self.rundir.path, self.rundir.path.name)
        if self.checkpoint_dir is not None:  # a finished run is never resumed
            for name in (CHECKPOINT_STATE, CHECKPOINT_MODEL):
                (self.checkpoint_dir / name).unlink(missing_ok=True)
        self.finished = True

    # ---- checkpoint / resume ---------------------------------------------------------------
    def _checkpoint(self, next_round: int) -> None:
        """After OpenFL round k: the model entering round k+1 (+ server state) and the run so far.

        Written atomically (temporary file, then rename; the model before the state that names
        it), so a crash at any moment leaves the previous checkpoint or this one, never half.
        """
        if self.checkpoint_dir is None:
            return
        from openfl.protocols import utils
        from openfl.utilities import TensorKey

        tensors = {}
        for name in [MODEL_BLOB, SERVER_STATE]:
            value = self.tensor_db.get_tensor_from_cache(TensorKey(name, self.uuid, next_round, False, (MODEL_TAG,)))
            if value is None:
                logger.warning("no checkpoint after round %d: %s is missing", next_round - 1, name)
                return
            tensors[name] = value
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        model_path = self.checkpoint_dir / CHECKPOINT_MODEL
        tmp = model_path.with_suffix(".tmp")
        utils.dump_proto(utils.construct_model_proto(tensors, next_round, LosslessPipeline()), str(tmp))
        tmp.replace(model_path)
        state = {"plan_sha256": self.plan_sha256, "openfl_round": next_round,
                 "openfl_rounds": self.rounds_to_train, "records": self._records,
                 "dropped": {str(r): s for r, s in self.dropped.items()},
                 "train_loss": {str(r): v for r, v in self._train.items()},
                 "elapsed_s": round(time.perf_counter() - self._started, 3)}
        state_path = self.checkpoint_dir / CHECKPOINT_STATE
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(json_safe(state), indent=1))
        tmp.replace(state_path)

    def _restore(self, state_path: Path) -> None:
        """Continue a run from :meth:`_checkpoint`'s state (the model came in as the initial one)."""
        state = json.loads(state_path.read_text())
        if state["openfl_round"] != self.round_number:
            raise RuntimeError(f"checkpoint says round {state['openfl_round']}, its model is round "
                               f"{self.round_number}")
        self.dropped = {int(r): list(s) for r, s in state["dropped"].items()}
        self._train = {int(r): dict(v) for r, v in state["train_loss"].items()}
        self._records = list(state["records"])
        for record in self._records:  # metrics.jsonl holds exactly the checkpointed rounds again
            self.rundir.log_round(record)
        self._last_record = self._records[-1] if self._records else None
        self._started -= float(state.get("elapsed_s", 0.0))
        logger.info("resuming at OpenFL round %d", self.round_number)
