"""Commands that run a real federation over OpenFL: set-up, certificates, aggregator, collaborators.

Order of work::

    centre:    fedfair-med init-federation NAME --task T --method M --sites A,B,C
    hospital:  fedfair-med collaborator setup BUNDLE.zip --name A [--manifest site.csv]
    centre:    fedfair-med certify --workspace workspaces/NAME col_A.csr …
    centre:    fedfair-med aggregator start --workspace workspaces/NAME
    hospital:  fedfair-med collaborator start BUNDLE --name A [--certificate col_A.crt]

Errors are one clear line (exit code 1), never a traceback.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Optional

# Before anything imports gRPC: its C core's own log lines stay off the console (see process.py).
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import typer
from rich.console import Console

console = Console(stderr=False)
err_console = Console(stderr=True)


def _fail(message: str) -> None:
    err_console.print(f"[red]error:[/red] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(1)


def _guard(action: Callable[[], Any]) -> Any:
    """Run ``action``; expected failures become one line and exit code 1."""
    from fedfair_med.config import ConfigError
    from fedfair_med.runtime.openfl.process import AggregatorUnreachable, FederationTimeout, PlanMismatch

    try:
        return action()
    except typer.Exit:
        raise
    except (ConfigError, ValueError, AggregatorUnreachable, FederationTimeout, PlanMismatch,
            FileNotFoundError, PermissionError, OSError) as err:
        text = str(err).strip()
        if isinstance(err, ConfigError):  # "invalid configuration:" then one problem per line
            text = " ".join(line.strip() for line in text.splitlines())
        _fail(text.splitlines()[0] if text else type(err).__name__)
    except KeyboardInterrupt:
        _fail("interrupted")


def _load_overrides(config: Optional[Path]) -> dict[str, Any]:
    import yaml

    from fedfair_med.config import ConfigError

    if config is None:
        return {}
    if not config.exists():
        raise ConfigError(f"{config}: no such configuration file")
    raw = yaml.safe_load(config.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{config}: must be a mapping of keys to values")
    return raw


def init_federation_cmd(
    name: str = typer.Argument(..., help="Federation name (becomes workspaces/NAME)."),
    task: str = typer.Option(..., "--task", help="Task, e.g. synthetic-seg, fundus."),
    method: str = typer.Option(..., "--method", help="Plan template: fedavg, flexfair-ea, …"),
    sites: str = typer.Option(..., "--sites", help="Comma-separated site names."),
    aggregator_host: str = typer.Option("127.0.0.1", "--aggregator-host", help="Aggregator address sites connect to."),
    port: int = typer.Option(50051, "--port", help="Aggregator port."),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="Federated rounds (default: the task's)."),
    lam: Optional[float] = typer.Option(None, "--lam", help="Penalty weight λ (methods that have one)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed of splits, initial weights "
                                                            "and batches (default 0); same seed, same numbers."),
    config: Optional[Path] = typer.Option(None, "--config", help="run.yaml with RunConfig keys."),
    workspaces_dir: Path = typer.Option(Path("workspaces"), "--workspaces-dir"),
    straggler_timeout: Optional[float] = typer.Option(
        None, "--straggler-timeout", help="Seconds before a round goes on without silent sites."),
    min_sites: Optional[int] = typer.Option(None, "--min-sites", help="Sites a round needs (with --straggler-timeout)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing workspace."),
    secure_aggregation: bool = typer.Option(
        False, "--secure-aggregation",
        help="Sites mask their updates; the aggregator only decodes sums over all sites."),
    secure_threshold: Optional[int] = typer.Option(
        None, "--secure-threshold",
        help="With --secure-aggregation: t, the sites needed to remove a dropped site's masks "
             "(n/2 < t <= n; default the smallest majority). Drop-outs need --straggler-timeout."),
) -> None:
    """Render the plan, create the certificate authority and one set-up bundle per site."""
    from fedfair_med.runtime.openfl.workspace import FederationError, init_federation

    def act() -> Any:
        overrides = _load_overrides(config)
        overrides.pop("runtime", None)
        if rounds is not None:
            overrides["rounds"] = rounds
        if seed is not None:
            overrides["seed"] = seed
        if lam is not None:
            from fedfair_med.algorithms import REGISTRY
            from fedfair_med.runtime.openfl.workspace import render_template

            method_name = render_template(method, host="x", port=1, sites=[], straggler_cutoff_s=None,
                                          min_sites=1, poll_interval_s=0.2)["fedfair"]["settings"]["method"]["method"]
            if "lam" not in REGISTRY[method_name].param_defaults():
                raise FederationError(f"--lam: method {method_name} has no penalty weight λ")
            overrides["method_params"] = {**overrides.get("method_params", {}), "lam": lam}
        site_list = [s.strip() for s in sites.split(",") if s.strip()]
        return init_federation(name, method=method, task=task, sites=site_list, host=aggregator_host,
                               port=port, overrides=overrides, workspaces_dir=workspaces_dir,
                               straggler_cutoff_s=straggler_timeout, min_sites=min_sites, force=force,
                               secure_aggregation=secure_aggregation, secure_threshold=secure_threshold)

    ws = _guard(act)
    console.print(f"[green]✓[/green] federation [bold]{name}[/bold] ready in {ws.path}")
    console.print(f"  method {ws.config.method} ({method}), task {ws.config.task}, "
                  f"{ws.spec['schedule']['rounds']} rounds, sites {', '.join(ws.spec['sites'])}")
    console.print("[bold]Send to each hospital[/bold] (plan + CA certificate + its name; no keys):")
    for site, bundle in ws.bundles.items():
        console.print(f"  {site}: {bundle}.zip")
    console.print("Each hospital runs [cyan]fedfair-med collaborator setup BUNDLE.zip --name SITE[/cyan] "
                  "and sends back only its certificate request.")


collaborator_app = typer.Typer(help="Hospital side: set up and run a collaborator.", no_args_is_help=True)
aggregator_app = typer.Typer(help="Coordinating centre: run the aggregator.", no_args_is_help=True)


@collaborator_app.command("setup")
def collaborator_setup(
    bundle: Path = typer.Argument(..., help="The bundle (.zip or folder) from the coordinating centre."),
    name: str = typer.Option(..., "--name", help="This site's name, as in the plan."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="This site's data manifest (real tasks)."),
    force: bool = typer.Option(
        False, "--force", help="Replace this site's existing key (its signed certificate is removed)."),
) -> None:
    """Check local data, make this site's key (kept here) and certificate request (to send)."""
    from fedfair_med.runtime.openfl.workspace import (
        FederationError, bundle_site, load_plan, make_certificate_request, open_bundle, plan_spec,
        refuse_new_key,
    )

    def act() -> Path:
        folder = open_bundle(bundle)
        spec = plan_spec(load_plan(folder / "plan/plan.yaml"))
        if name not in spec["sites"]:
            raise FederationError(f"{name!r} is not a site of this federation (sites: {', '.join(spec['sites'])})")
        if bundle_site(folder) != name:
            raise FederationError(f"this bundle was made for site {bundle_site(folder)!r}, not {name!r}")
        refuse_new_key(folder, name, force)  # before anything else is made
        if manifest is not None:
            _check_manifest(manifest, spec["run"]["task"], name)
        if spec.get("secure_aggregation"):
            from fedfair_med.runtime.openfl.secure import make_site_keys

            make_site_keys(folder, name)
        return make_certificate_request(folder, name, force=force)

    request = _guard(act)
    console.print(f"[green]✓[/green] key kept in {request.with_suffix('.key')} (never send it)")
    console.print(f"Send [bold]{request}[/bold] to the coordinating centre for signing.")
    public = request.parent / f"col_{name}.secagg.pub"
    if public.exists():
        console.print(f"Secure aggregation: send [bold]{public}[/bold] with it (a public key).")


def _check_manifest(manifest: Path, task: str, site: str) -> None:
    from fedfair_med.runtime.openfl.workspace import FederationError

    try:
        from fedfair_med.data.manifest import load_manifest
        from fedfair_med.data.validate import check_manifest_for_task
    except ImportError:
        console.print("[yellow]note:[/yellow] data validation is not available in this version; skipped")
        return
    result = check_manifest_for_task(load_manifest(manifest, site=site), task)
    if result.problems:
        raise FederationError(f"{manifest}: {len(result.problems)} problem(s), first: {result.problems[0]}")
    console.print(f"[green]✓[/green] {manifest}: data checked, no problems")


def certify_cmd(
    requests: list[Path] = typer.Argument(..., help="Certificate requests (col_SITE.csr) from hospitals."),
    workspace: Path = typer.Option(..., "--workspace", help="workspaces/NAME"),
) -> None:
    """Sign certificate requests — only for sites named in the plan."""
    from fedfair_med.runtime.openfl.workspace import certify_request

    for request in requests:
        target = _guard(lambda: certify_request(workspace, request))
        console.print(f"[green]✓[/green] signed {request.name} → {target} (send it back to that site)")


@aggregator_app.command("start")
def aggregator_start(
    workspace: Path = typer.Option(..., "--workspace", help="workspaces/NAME"),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Give up after this many seconds."),
    finish_grace: float = typer.Option(
        15.0, "--finish-grace", help="Seconds to wait, after the last round, for sites to be told to stop."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the checkpoint of the last finished round (same plan only)."),
    idle_timeout: float = typer.Option(
        7200.0, "--idle-timeout",
        help="Stop if no site reports anything for this many seconds (set above the slowest site's round)."),
) -> None:
    """Run every round; write run.yaml, metrics.jsonl, model.pt and report.json to WORKSPACE/run."""
    from fedfair_med.runtime.openfl.process import run_aggregator

    console.print(f"aggregator serving {workspace}{' (resuming)' if resume else ''} …")
    def warn(line: str) -> None:
        err_console.print(f"[yellow]warning:[/yellow] {line}", highlight=False, soft_wrap=True)

    run_dir = _guard(lambda: run_aggregator(workspace, timeout_s=timeout, finish_grace_s=finish_grace,
                                            resume=resume, idle_timeout_s=idle_timeout, warn=warn))

    from fedfair_med.runtime.rundir import read_metrics

    for record in read_metrics(run_dir):
        dropped = f"  dropped: {', '.join(record['dropped'])}" if record.get("dropped") else ""
        console.print(f"  round {record['round']}: metric {record['metric']:.4f}{dropped}")
    console.print(f"[green]✓[/green] run directory: {run_dir}")


@collaborator_app.command("start")
def collaborator_start(
    bundle: Path = typer.Argument(..., help="This site's bundle folder (after setup)."),
    name: str = typer.Option(..., "--name", help="This site's name, as in the plan (e.g. site-a)."),
    certificate: Optional[Path] = typer.Option(None, "--certificate", help="The signed col_SITE.crt, if not yet in the bundle."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="This site's data manifest CSV "
                                                                    "(required for real tasks; synthetic tasks need none)."),
    connect_timeout: float = typer.Option(60.0, "--connect-timeout", help="Give up after this many seconds without the aggregator."),
    call_timeout: float = typer.Option(
        300.0, "--call-timeout", help="Deadline of one call to the aggregator (then retried)."),
    force: bool = typer.Option(
        False, "--force", help="Let --certificate replace a different certificate already in the bundle."),
    device: Optional[str] = typer.Option(
        None, "--device", help="Where this site trains: auto, cpu, cuda or cuda:N (default: the plan's)."),
) -> None:
    """Join the federation: train, evaluate, send only weights and aggregate summaries."""
    from fedfair_med.runtime.openfl.process import run_collaborator
    from fedfair_med.runtime.openfl.workspace import FederationError, check_site_credentials, open_bundle

    def act() -> Path:
        folder = open_bundle(bundle)
        if certificate is not None:  # checked before it is copied: the bundle's own stays intact
            check_site_credentials(folder, name, certificate)
            target = folder / f"cert/client/col_{name}.crt"
            if target.exists() and target.read_bytes() != certificate.read_bytes() and not force:
                raise FederationError(f"{target} already holds another certificate for {name}; "
                                      "use --force to replace it")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(certificate, target)

        def progress(task: str, round_index: int, info: dict[str, Any]) -> None:
            detail = " ".join(f"{k} {v:.4f}" for k, v in info.items())
            console.print(f"  {name}: {task.replace('fedfair_', '')} round {round_index} {detail}")

        return run_collaborator(folder, name, manifest=manifest, connect_timeout_s=connect_timeout,
                                call_timeout_s=call_timeout, progress=progress, device=device,
                                announce=lambda line: console.print(f"  {name}: {line}", highlight=False))

    out = _guard(act)
    console.print(f"[green]✓[/green] {name} finished; predictions stay in {out}")


def register(app: typer.Typer) -> None:
    """Attach init-federation, certify and the aggregator/collaborator groups to ``app``."""
    app.command("init-federation")(init_federation_cmd)
    app.command("certify")(certify_cmd)
    app.add_typer(aggregator_app, name="aggregator")
    app.add_typer(collaborator_app, name="collaborator")


def main() -> None:  # pragma: no cover - used by tests and `python -m`
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)
    register(app)
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
