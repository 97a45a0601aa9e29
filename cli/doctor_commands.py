"""``fedfair-med doctor [CONFIG]``: what a run will use on this machine, before a long run starts.

Device and precision as the configuration resolves here, torch / CUDA / cuDNN / MONAI / OpenFL
versions and thread counts. An unusable device or precision is one line and exit code 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

console = Console()


def device_line(config: Any, device: str | None = None) -> str:
    """The one line simulate and collaborator start print first (ConfigError if unusable)."""
    from fedfair_med.runtime.device import placement, start_line

    return start_line(placement(device or config.device, config.precision))


def register(app: typer.Typer) -> None:
    @app.command()
    def doctor(
        config_file: Optional[Path] = typer.Argument(None, help="Run configuration (YAML)."),
        device: Optional[str] = typer.Option(
            None, "--device", help="Check this device instead of the configuration's."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ) -> None:
        """Show the device, precision, library versions and threads a run will use here."""
        from fedfair_med.config import ConfigError, load_config
        from fedfair_med.runtime.device import environment, placement, start_line

        try:
            config = load_config(config_file if config_file is not None else {})
        except ConfigError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None
        env = environment()
        setting = device or config.device
        problem, place = None, None
        try:
            place = placement(setting, config.precision)
        except ConfigError as err:
            problem = str(err)
        if as_json:
            report = {"device_setting": setting, "device": str(place.device) if place else None,
                      "precision": config.precision, "deterministic": config.deterministic,
                      "problem": problem, **env}
            typer.echo(json.dumps(report, indent=2))
        else:
            cudnn = env["cudnn"] if env["cudnn"] is not None else "none"
            cuda = (f"build {env['cuda_build']}, " if env["cuda_build"] else "CPU-only build, ") + (
                f"{len(env['gpus'])} GPU(s): {', '.join(env['gpus'])}" if env["gpus"]
                else "no GPU visible")
            rows = [
                ("device", place.describe().split(", precision")[0][len("device "):] if place
                 else f"{setting} (unusable here)"),
                ("precision", config.precision),
                ("deterministic", str(config.deterministic).lower()),
                ("torch", env["torch"]), ("CUDA", cuda), ("cuDNN", str(cudnn)),
                ("MONAI", env["monai"]), ("OpenFL", env["openfl"]), ("Opacus", env["opacus"]),
                ("threads", f"{env['torch_threads']} intra-op, {env['torch_interop_threads']} "
                            f"inter-op; {env['cpu_count']} CPUs"),
                ("python", env["python"]),
            ]
            for key, value in rows:
                console.print(f"{key:<14} {value}", highlight=False)
            if place is not None:
                console.print(f"start line: {start_line(place)}", highlight=False)
        if problem:
            typer.echo(f"error: {problem}", err=True)
            raise typer.Exit(1)
