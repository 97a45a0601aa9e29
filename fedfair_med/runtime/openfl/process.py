"""Start and stop an aggregator or a collaborator, with every wait bounded.

OpenFL's own entry points (``fx aggregator start`` / ``fx collaborator start``) wait without
limits: the aggregator serves until every collaborator has been told to quit (forever, if one
died), and a collaborator's gRPC client retries forever while the aggregator is unreachable
(or refuses its certificate). Here:

* :func:`run_aggregator` serves with OpenFL's gRPC servicer but its own loop: it stops once every
  site was told to quit, or ``finish_grace_s`` after the last round finished (a dead site is never
  told), or raises :class:`FederationTimeout` after ``timeout_s``. A site that stops reporting is
  cut off by the plan's straggler policy (``CutoffTimePolicy``) and recorded as dropped.
  Persistence (``local_state/tensor.db`` resume) is off in our plans, so a restarted aggregator
  starts a fresh run instead of silently resuming a stale one.
* :func:`run_collaborator` uses a client whose reconnect policy gives up after
  ``connect_timeout_s`` seconds without a successful call (:class:`AggregatorUnreachable`).

Our collaborator class also caps OpenFL's hard-coded 10 s idle poll (see
:class:`~fedfair_med.runtime.openfl.taskrunner.FedFairCollaborator`); nothing in site-packages is
patched.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

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


class BoundedClient(AggregatorGRPCClient):
    """OpenFL's gRPC client; a successful call resets the give-up clock."""

    def __init__(self, *args: Any, connect_timeout_s: float = 60.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sleeping_policy = BoundedBackoff(self.sleeping_policy.reconnect_interval, self.uri,
                                              connect_timeout_s)

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

    return Plan.parse(plan_config_path=(plan_dir / "plan.yaml").absolute(),
                      cols_config_path=(plan_dir / "cols.yaml").absolute())


def run_aggregator(workspace: Path, *, timeout_s: float | None = None, finish_grace_s: float = 15.0,
                   poll_s: float = 0.1) -> Path:
    """Serve the federation in ``workspace`` until it is finished; return its run directory."""
    from openfl.protocols import aggregator_pb2_grpc
    from openfl.transport.grpc.common import create_grpc_server

    from fedfair_med.runtime.openfl.workspace import FederationError

    _quiet_openfl()
    workspace = Path(workspace).resolve()
    if not (workspace / "plan/plan.yaml").exists():
        raise FederationError(f"{workspace}: not a federation workspace (no plan/plan.yaml)")
    plan = _parse(workspace / "plan")
    settings = plan.config["aggregator"]["settings"]
    for key in ("init_state_path", "best_state_path", "last_state_path", "run_dir"):
        settings[key] = str(workspace / settings[key])
    (workspace / "save").mkdir(exist_ok=True)
    host = plan.config["network"]["settings"]["agg_addr"].lower()
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
    try:
        while not aggregator.all_quit_jobs_sent():
            now = time.monotonic()
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
                     connect_timeout_s: float = 60.0,
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
    runner = SiteTaskRunner(spec, site=name, manifest=manifest, out_dir=out_dir, progress=progress)
    args = plan.get_client_args(name, root_certificate=str(bundle / "cert/cert_chain.crt"),
                                private_key=str(key), certificate=str(crt))
    client = BoundedClient(connect_timeout_s=connect_timeout_s, **args)
    collaborator = plan.get_collaborator(name, task_runner=runner, client=client)
    collaborator.run()
    return out_dir
