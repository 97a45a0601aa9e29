"""Start and stop an aggregator or a collaborator, with every wait bounded.

OpenFL's own entry points (``fx aggregator start`` / ``fx collaborator start``) wait without
limits: the aggregator serves until every collaborator has been told to quit (forever, if one
died), and a collaborator's gRPC client retries forever while the aggregator is unreachable
(or refuses its certificate). Here:

* :func:`run_aggregator` serves with OpenFL's gRPC servicer but its own loop: it stops once every
  site was told to quit, or ``finish_grace_s`` after the last round finished (a dead site is never
  told), or raises :class:`FederationTimeout` after ``timeout_s``. A site that stops reporting is
  cut off by the plan's straggler policy (``CutoffTimePolicy``) and recorded as dropped.
  With ``idle_timeout_s`` it also stops when no site has reported anything for that long (a dead
  site under wait-for-all). OpenFL's ``tensor.db`` persistence is off in our plans; instead the
  aggregator checkpoints after every round and continues only with ``resume=True``, refusing a
  workspace whose plan changed since.
* :func:`run_collaborator` uses a client whose reconnect policy gives up after
  ``connect_timeout_s`` seconds without a successful call (:class:`AggregatorUnreachable`), and
  whose every call has a deadline (``call_timeout_s``; OpenFL's stubs set none).

Our collaborator class also caps OpenFL's hard-coded 10 s idle poll (see
:class:`~fedfair_med.runtime.openfl.taskrunner.FedFairCollaborator`); nothing in site-packages is
patched.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

# gRPC's C core writes its own log lines ("Invalid private key", handshake failures…) straight to
# stderr; they say nothing a user can act on, and every such failure gets one clear line of ours.
# GRPC_VERBOSITY=ERROR (or DEBUG) in the environment brings them back for debugging.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
import grpc  # noqa: E402
from openfl.transport.grpc.aggregator_client import AggregatorGRPCClient

from fedfair_med.runtime.openfl.spec import plan_fingerprint

logger = logging.getLogger(__name__)


class FederationTimeout(RuntimeError):
    """The aggregator's run exceeded its time limit."""


class AggregatorUnreachable(RuntimeError):
    """A collaborator could not talk to the aggregator for too long (down, wrong CA, refused)."""


class PlanMismatch(RuntimeError):
    """The aggregator and a site hold different plans (OpenFL's federation id is the plan hash)."""


#: Marks the aggregator's refusal of a site whose plan differs (a gRPC status detail).
PLAN_MISMATCH = "plan mismatch"
#: What OpenFL's own request check says when the plan hash in a header differs.
_OPENFL_MISMATCH = ("does not match aggregator UUID", "Federation UUID in request header does not match")


def plan_hash_of(federation_uuid: str) -> str:
    """The plan-hash prefix in OpenFL's federation id ``<plan name>_<sha384[:8]>``."""
    return federation_uuid.rsplit("_", 1)[-1]


def _plan_mismatch_of(error: Any, ours: str) -> PlanMismatch | None:
    """A site-side :class:`PlanMismatch` for an aggregator's refusal of this site's plan, or None."""
    if not isinstance(error, grpc.RpcError) or not hasattr(error, "code"):
        return None
    details = str(error.details() or "")
    if error.code() == grpc.StatusCode.FAILED_PRECONDITION and details.startswith(PLAN_MISMATCH):
        theirs = details.split("aggregator plan ", 1)[-1].split()[0].strip(";,)") if "aggregator plan " in details else "?"
    elif error.code() == grpc.StatusCode.UNKNOWN and any(m in details for m in _OPENFL_MISMATCH):
        theirs = "?"
    else:
        return None
    return PlanMismatch(
        f"the aggregator runs another plan (plan hash {theirs}) than this site's bundle (plan hash "
        f"{ours}): the plan was changed at the centre after this bundle was issued; ask the "
        "coordinating centre for the current bundle (or to restore the plan the bundles carry)")


class BoundedBackoff:
    """OpenFL's constant reconnect interval, but giving up after ``limit_s`` of failures."""

    def __init__(self, interval_s: float, uri: str, limit_s: float) -> None:
        self.interval_s, self.uri, self.limit_s = float(interval_s), uri, float(limit_s)
        self.failing_since: float | None = None

    def reset(self) -> None:
        self.failing_since = None

    def sleep(self) -> None:
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = now
        if now - self.failing_since > self.limit_s:
            raise AggregatorUnreachable(
                f"no answer from the aggregator at {self.uri} for {self.limit_s:g} s "
                "(is it running, and was this site's certificate signed by the federation's CA?)")
        time.sleep(self.interval_s)


class _CallDeadline(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """Give every call without a deadline one: OpenFL's stubs have none, so an aggregator that
    is alive but stuck would block a site forever. A call past it fails and is retried under
    :class:`BoundedBackoff`."""

    class _Details(collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials",
                                                        "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
        pass

    def __init__(self, timeout_s: float, plan_hash: str = "?") -> None:
        self.timeout_s = float(timeout_s)
        self.plan_hash = plan_hash

    def _checked(self, outcome: Any) -> Any:
        """An aggregator refusing this site's plan will refuse every retry: stop at once."""
        mismatch = _plan_mismatch_of(outcome, self.plan_hash)
        if mismatch is not None:
            raise mismatch
        return outcome

    def _with_deadline(self, details: Any) -> Any:
        if details.timeout is not None:
            return details
        return self._Details(details.method, self.timeout_s, details.metadata, details.credentials,
                             getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return self._checked(continuation(self._with_deadline(details), request))

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return self._checked(continuation(self._with_deadline(details), request_iterator))


class BoundedClient(AggregatorGRPCClient):
    """OpenFL's gRPC client; a successful call resets the give-up clock; every call has a deadline."""

    def __init__(self, *args: Any, connect_timeout_s: float = 60.0, call_timeout_s: float = 300.0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.call_timeout_s = float(call_timeout_s)
        self.sleeping_policy = BoundedBackoff(self.sleeping_policy.reconnect_interval, self.uri,
                                              connect_timeout_s)
        self._bound_stub()

    def _bound_stub(self) -> None:
        from openfl.protocols import aggregator_pb2_grpc

        channel = grpc.intercept_channel(self.channel, _CallDeadline(
            self.call_timeout_s, plan_hash_of(self.federation_uuid)))
        self.stub = aggregator_pb2_grpc.AggregatorStub(channel)

    def reconnect(self) -> None:
        super().reconnect()
        self._bound_stub()

    def _ok(self, value: Any) -> Any:
        self.sleeping_policy.reset()
        return value

    def ping(self) -> None:
        return self._ok(super().ping())

    def get_tasks(self) -> Any:
        return self._ok(super().get_tasks())

    def get_aggregated_tensor(self, *args: Any, **kwargs: Any) -> Any:
        return self._ok(super().get_aggregated_tensor(*args, **kwargs))

    def send_local_task_results(self, *args: Any, **kwargs: Any) -> Any:
        return self._ok(super().send_local_task_results(*args, **kwargs))


def _quiet_openfl(log_file: Path | None = None) -> None:
    """OpenFL's and gRPC's Python log records go to ``log_file`` (none on the console): every
    failure a user must act on gets one line of ours instead."""
    for name in ("openfl", "grpc"):
        logger_ = logging.getLogger(name)
        for handler in [h for h in logger_.handlers if getattr(h, "_fedfair", False)]:
            logger_.removeHandler(handler)
            handler.close()
        if log_file is None:
            logger_.setLevel(logging.WARNING)
            continue
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler._fedfair = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger_.addHandler(handler)
        logger_.setLevel(logging.INFO)
        logger_.propagate = False


def _refuse_other_plans(server: Any, on_mismatch: Callable[[str, str], None],
                        on_match: Callable[[str], None]) -> None:
    """Refuse, at once and by name, a site whose plan differs from the aggregator's.

    OpenFL puts the plan hash in every request header and rejects a different one with an
    assertion (gRPC status UNKNOWN), which its client retries forever; the site cannot tell it
    from an unreachable aggregator. Here the refusal is a FAILED_PRECONDITION saying "plan
    mismatch" with both hashes, and the aggregator is told which site it was.
    """
    validate = server.validate_collaborator
    aggregator = server.aggregator

    def checked(request: Any, context: Any) -> None:
        validate(request, context)  # the certificate's name is the sender's (mutual TLS)
        header = request.header
        site = header.sender
        if header.federation_uuid == aggregator.federation_uuid and header.receiver == aggregator.uuid:
            on_match(site)
            return
        theirs, ours = plan_hash_of(header.federation_uuid), plan_hash_of(aggregator.federation_uuid)
        on_mismatch(site, f"site {site!r} holds another plan (plan hash {theirs}) than this aggregator "
                          f"(plan hash {ours}): the plan was changed after the bundles were issued; "
                          "restore it, or send every site the current bundle")
        context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                      f"{PLAN_MISMATCH}: site plan {theirs}, aggregator plan {ours}")

    server.validate_collaborator = checked


def _check_bundles_carry_the_plan(workspace: Path, warn: Callable[[str], None]) -> None:
    """Warn when ``plan/`` changed after the bundles were made: their sites will be refused."""
    fingerprint = plan_fingerprint(workspace / "plan")
    stale = []
    for site_json in sorted((workspace / "bundles").glob("*/site.json")):
        try:
            recorded = json.loads(site_json.read_text()).get("plan_sha256")
        except ValueError:
            continue
        if recorded is not None and recorded != fingerprint:
            stale.append(site_json.parent.name)
    if stale:
        warn(f"{workspace / 'plan'} changed after the bundles of {', '.join(stale)} were issued: "
             "sites holding those bundles will be refused (plan mismatch); restore the plan, or "
             "re-issue the bundles")


def _parse(plan_dir: Path) -> Any:
    from openfl.federated import Plan

    from fedfair_med.runtime.openfl.workspace import load_plan

    load_plan(plan_dir / "plan.yaml")  # a broken or inconsistent plan fails here, in one line
    return Plan.parse(plan_config_path=(plan_dir / "plan.yaml").absolute(),
                      cols_config_path=(plan_dir / "cols.yaml").absolute())


def _check_secure_keys(workspace: Path, spec: dict) -> None:
    """Under secure aggregation every site's public key must be in the initial server state."""
    if not spec.get("secure_aggregation"):
        return
    from openfl.protocols import utils

    from fedfair_med.runtime.openfl.wire import SERVER_STATE, LosslessPipeline, unpack_state
    from fedfair_med.runtime.openfl.secure import missing_public_keys
    from fedfair_med.runtime.openfl.workspace import FederationError

    tensors, _ = utils.deconstruct_model_proto(utils.load_proto(str(workspace / "save/init.pbuf")),
                                               LosslessPipeline())
    missing = missing_public_keys(unpack_state(tensors[SERVER_STATE]), spec["sites"])
    if missing:
        raise FederationError(f"secure aggregation: no key-agreement public key for site(s) {missing}; "
                              "certify their requests (with col_SITE.secagg.pub) first")


def _progress(aggregator: Any) -> tuple[int, int]:
    """(round, task results received): changes whenever any site gets anything done."""
    return aggregator.round_number, len(aggregator.collaborator_tasks_results)


def _check_port_free(port: int) -> None:
    """Fail in one line if another process listens on the aggregator's port (gRPC's own error
    comes late and obscure)."""
    import socket

    from fedfair_med.runtime.openfl.workspace import FederationError

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT after a restart is fine
        try:
            probe.bind(("", port))
        except OSError as err:
            raise FederationError(f"port {port} is in use ({err.strerror}); is another aggregator "
                                  "running? stop it, or init the federation with another --port") from None


def _resume_settings(workspace: Path, settings: dict, resume: bool) -> None:
    """Point the aggregator at its checkpoint (``--resume``), or say that one is being ignored."""
    from fedfair_med.runtime.openfl.aggregation import CHECKPOINT_MODEL, CHECKPOINT_STATE
    from fedfair_med.runtime.openfl.workspace import FederationError

    save = workspace / "save"
    state_path, model_path = save / CHECKPOINT_STATE, save / CHECKPOINT_MODEL
    settings["checkpoint_dir"] = str(save)
    settings["plan_sha256"] = plan_fingerprint(workspace / "plan")
    if not resume:
        if state_path.exists():
            logger.warning("%s: a checkpoint exists but --resume was not given; starting the run over",
                           state_path)
        return
    if not state_path.exists() or not model_path.exists():
        raise FederationError(f"--resume: no checkpoint in {save} (none was written, or the run "
                              "finished); start without --resume")
    try:
        state = json.loads(state_path.read_text())
        recorded = state["plan_sha256"]
    except (ValueError, KeyError) as err:
        raise FederationError(f"--resume: {state_path} is unreadable ({err})") from None
    if recorded != settings["plan_sha256"]:
        raise FederationError("--resume: the plan changed since the checkpoint was written "
                              f"({workspace / 'plan'}); refusing to continue a run under another plan")
    settings["init_state_path"] = str(model_path)
    settings["resume_from"] = str(state_path)
    logger.warning("resuming from OpenFL round %d of %d", state["openfl_round"], state["openfl_rounds"])


def run_aggregator(workspace: Path, *, timeout_s: float | None = None, finish_grace_s: float = 15.0,
                   poll_s: float = 0.1, resume: bool = False, idle_timeout_s: float | None = 7200.0,
                   warn: Callable[[str], None] | None = None) -> Path:
    """Serve the federation in ``workspace`` until it is finished; return its run directory.

    After every OpenFL round the aggregator checkpoints to ``save/resume.{pbuf,json}``;
    ``resume=True`` continues from there (refused if the plan changed). ``warn`` receives one
    line per problem worth a look while serving (default: this module's logger); a site holding
    another plan is named there at once, and when every site does the run stops with that reason.
    OpenFL's and gRPC's own log lines go to ``WORKSPACE/logs/aggregator.log``.
    """
    from openfl.protocols import aggregator_pb2_grpc
    from openfl.transport.grpc.common import create_grpc_server

    from fedfair_med.runtime.openfl.workspace import FederationError

    warn = warn or logger.warning
    workspace = Path(workspace).resolve()
    if not (workspace / "plan/plan.yaml").exists():
        raise FederationError(f"{workspace}: not a federation workspace (no plan/plan.yaml)")
    _quiet_openfl(workspace / "logs/aggregator.log")
    plan = _parse(workspace / "plan")
    _check_bundles_carry_the_plan(workspace, warn)
    settings = plan.config["aggregator"]["settings"]
    _check_secure_keys(workspace, settings["spec"])
    for key in ("init_state_path", "best_state_path", "last_state_path", "run_dir"):
        settings[key] = str(workspace / settings[key])
    _resume_settings(workspace, settings, resume)
    (workspace / "save").mkdir(exist_ok=True)
    host = plan.config["network"]["settings"]["agg_addr"].lower()
    _check_port_free(int(plan.config["network"]["settings"]["agg_port"]))
    cert = workspace / "cert"
    try:
        server = plan.get_server(root_certificate=str(cert / "cert_chain.crt"),
                                 certificate=str(cert / f"server/agg_{host}.crt"),
                                 private_key=str(cert / f"server/agg_{host}.key"))
    except TypeError as err:  # a setting the plan's class does not take (e.g. a misspelt key)
        raise FederationError(f"{workspace / 'plan/plan.yaml'}: OpenFL cannot build the aggregator "
                              f"from this plan: {err}") from None
    aggregator = server.aggregator
    mismatched: dict[str, str] = {}

    def on_mismatch(site: str, line: str) -> None:
        if site not in mismatched:
            warn(line)
        mismatched[site] = line

    _refuse_other_plans(server, on_mismatch, lambda site: mismatched.pop(site, None))
    grpc_server = create_grpc_server(server.uri, server.use_tls, server.private_key,
                                     server.certificate, server.root_certificate,
                                     server.require_client_auth, None)
    aggregator_pb2_grpc.add_AggregatorServicer_to_server(server, grpc_server)
    grpc_server.start()
    started = time.monotonic()
    finished_at: float | None = None
    progress, progress_at = _progress(aggregator), started
    try:
        while not aggregator.all_quit_jobs_sent():
            now = time.monotonic()
            if _progress(aggregator) != progress:
                progress, progress_at = _progress(aggregator), now
            elif (idle_timeout_s is not None and not aggregator.finished
                  and now - progress_at > idle_timeout_s):
                waiting = sorted(set(aggregator.authorized_cols) - set(aggregator.collaborators_done))
                stale = f"; {', '.join(sorted(mismatched))} hold(s) another plan" if mismatched else ""
                raise FederationTimeout(
                    f"no site reported anything for {idle_timeout_s:g} s in OpenFL round "
                    f"{aggregator.round_number} (still waiting for {', '.join(waiting) or 'nobody'}{stale}); "
                    "restart the missing sites, or resume later with --resume")
            if mismatched and set(aggregator.authorized_cols) <= set(mismatched):
                raise FederationError(
                    f"plan mismatch: every site ({', '.join(sorted(mismatched))}) holds another plan "
                    f"than {workspace / 'plan/plan.yaml'} (changed after the bundles were issued); "
                    "restore the plan, or send every site the current bundle")
            if aggregator.failure:
                raise FederationError(aggregator.failure)
            if aggregator.finished:
                finished_at = finished_at or now
                if now - finished_at > finish_grace_s:
                    logger.warning("not every site was told to quit; stopping anyway")
                    break
            if timeout_s is not None and now - started > timeout_s:
                raise FederationTimeout(f"the federation did not finish within {timeout_s:g} s")
            time.sleep(poll_s)
    finally:
        grpc_server.stop(0)
    return Path(settings["run_dir"])


def run_collaborator(bundle: Path, name: str, *, manifest: str | Path | None = None,
                     connect_timeout_s: float = 60.0, call_timeout_s: float = 300.0,
                     progress: Callable[[str, int, dict[str, Any]], None] | None = None,
                     device: str | None = None, announce: Callable[[str], None] | None = None) -> Path:
    """Take part in the federation described by ``bundle`` as site ``name``; return its run dir.

    ``device`` overrides the plan's for this site; ``announce`` receives the one line saying
    which device, precision and threads the site will use, before it connects."""
    from fedfair_med.runtime.openfl.taskrunner import SiteTaskRunner
    from fedfair_med.runtime.openfl.workspace import (
        FederationError, check_bundle_plan, check_site_credentials, plan_spec,
    )

    bundle = Path(bundle).resolve()
    key = bundle / f"cert/client/col_{name}.key"
    crt = bundle / f"cert/client/col_{name}.crt"
    check_site_credentials(bundle, name)  # key, certificate, name and CA, before any connection
    _quiet_openfl(bundle / "logs/collaborator.log")
    plan = _parse(bundle / "plan")
    check_bundle_plan(bundle)
    spec = plan_spec(plan.config)
    from fedfair_med.runtime.device import placement
    from fedfair_med.runtime.openfl.spec import FederationSpec

    planned = FederationSpec.from_settings(spec).config()
    placement(device or planned.device, planned.precision)  # unusable here: one line, before connecting
    args = plan.get_client_args(name, root_certificate=str(bundle / "cert/cert_chain.crt"),
                                private_key=str(key), certificate=str(crt))
    client = BoundedClient(connect_timeout_s=connect_timeout_s, call_timeout_s=call_timeout_s, **args)
    client.ping()  # a refused plan or certificate shows now, before any data is loaded
    out_dir = bundle / "run"
    runner = SiteTaskRunner(spec, site=name, manifest=manifest, out_dir=out_dir, progress=progress,
                            bundle=bundle, device=device)
    from fedfair_med.runtime.device import start_line, write_site_record

    write_site_record(out_dir, name, runner.site_runner.placement)
    if announce is not None:
        announce(start_line(runner.site_runner.placement))
    try:
        collaborator = plan.get_collaborator(name, task_runner=runner, client=client)
    except TypeError as err:  # a setting the plan's class does not take (e.g. a misspelt key)
        raise FederationError(f"{bundle / 'plan/plan.yaml'}: OpenFL cannot build the collaborator "
                              f"from this plan: {err}") from None
    collaborator.run()
    return out_dir
