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
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import grpc
from openfl.transport.grpc.aggregator_client import AggregatorGRPCClient

logger = logging.getLogger(__name__)


class FederationTimeout(RuntimeError):
    """The aggregator's run exceeded its time limit."""


class AggregatorUnreachable(RuntimeError):
    """A collaborator could not talk to the aggregator for too long (down, wrong CA, refused)."""


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

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = float(timeout_s)

    def _with_deadline(self, details: Any) -> Any:
        if details.timeout is not None:
            return details
        return self._Details(details.method, self.timeout_s, details.metadata, details.credentials,
                             getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_deadline(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._with_deadline(details), request_iterator)


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

        channel = grpc.intercept_channel(self.channel, _CallDeadline(self.call_timeout_s))
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


def _quiet_openfl() -> None:
    for name in ("openfl", "grpc"):
        logging.getLogger(name).setLevel(logging.WARNING)


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

    from fedfair_med.runtime.openfl.protocol import SERVER_STATE, LosslessPipeline, unpack_state
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


def plan_fingerprint(plan_dir: Path) -> str:
    """sha256 over plan.yaml and cols.yaml: a checkpoint resumes only the plan that wrote it."""
    digest = hashlib.sha256()
    for name in ("plan.yaml", "cols.yaml"):
        digest.update(name.encode() + b"\0" + (Path(plan_dir) / name).read_bytes() + b"\0")
    return digest.hexdigest()


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
                   poll_s: float = 0.1, resume: bool = False, idle_timeout_s: float | None = 7200.0) -> Path:
    """Serve the federation in ``workspace`` until it is finished; return its run directory.

    After every OpenFL round the aggregator checkpoints to ``save/resume.{pbuf,json}``;
    ``resume=True`` continues from there (refused if the plan changed).
    """
    from openfl.protocols import aggregator_pb2_grpc
    from openfl.transport.grpc.common import create_grpc_server

    from fedfair_med.runtime.openfl.workspace import FederationError

    _quiet_openfl()
    workspace = Path(workspace).resolve()
    if not (workspace / "plan/plan.yaml").exists():
        raise FederationError(f"{workspace}: not a federation workspace (no plan/plan.yaml)")
    plan = _parse(workspace / "plan")
    settings = plan.config["aggregator"]["settings"]
    _check_secure_keys(workspace, settings["spec"])
    for key in ("init_state_path", "best_state_path", "last_state_path", "run_dir"):
        settings[key] = str(workspace / settings[key])
    _resume_settings(workspace, settings, resume)
    (workspace / "save").mkdir(exist_ok=True)
    host = plan.config["network"]["settings"]["agg_addr"].lower()
    _check_port_free(int(plan.config["network"]["settings"]["agg_port"]))
    cert = workspace / "cert"
    server = plan.get_server(root_certificate=str(cert / "cert_chain.crt"),
                             certificate=str(cert / f"server/agg_{host}.crt"),
                             private_key=str(cert / f"server/agg_{host}.key"))
    aggregator = server.aggregator
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
                raise FederationTimeout(
                    f"no site reported anything for {idle_timeout_s:g} s in OpenFL round "
                    f"{aggregator.round_number} (still waiting for {', '.join(waiting) or 'nobody'}); "
                    "restart the missing sites, or resume later with --resume")
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
                     progress: Callable[[str, int, dict[str, Any]], None] | None = None) -> Path:
    """Take part in the federation described by ``bundle`` as site ``name``; return its run dir."""
    from fedfair_med.runtime.openfl.taskrunner import SiteTaskRunner
    from fedfair_med.runtime.openfl.workspace import FederationError, plan_spec

    _quiet_openfl()
    bundle = Path(bundle).resolve()
    key = bundle / f"cert/client/col_{name}.key"
    crt = bundle / f"cert/client/col_{name}.crt"
    for path, hint in ((key, "run `collaborator setup` first"),
                       (crt, "ask the coordinating centre to certify this site's request")):
        if not path.exists():
            raise FederationError(f"{path} is missing: {hint}")
    plan = _parse(bundle / "plan")
    spec = plan_spec(plan.config)
    out_dir = bundle / "run"
    runner = SiteTaskRunner(spec, site=name, manifest=manifest, out_dir=out_dir, progress=progress,
                            bundle=bundle)
    args = plan.get_client_args(name, root_certificate=str(bundle / "cert/cert_chain.crt"),
                                private_key=str(key), certificate=str(crt))
    client = BoundedClient(connect_timeout_s=connect_timeout_s, call_timeout_s=call_timeout_s, **args)
    collaborator = plan.get_collaborator(name, task_runner=runner, client=client)
    collaborator.run()
    return out_dir
