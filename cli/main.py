"""The ``fedfair-med`` command line: thin Typer commands that parse, call the library, print.

Each command group lives in its own module under ``cli/`` and is attached here with one line.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="fedfair-med",
    help="Fairness-aware federated learning for medical imaging (FlexFair and baselines).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _attach() -> None:
    """Register every command module (one line each)."""
    from fedfair_med.cli import (
        data_commands, doctor_commands, federation_commands, report_commands, run_commands,
        sweep_commands,
    )

    run_commands.register(app)
    data_commands.register(app)
    report_commands.register(app)
    sweep_commands.register(app)
    federation_commands.register(app)
    doctor_commands.register(app)


_attach()


if __name__ == "__main__":  # pragma: no cover
    app()
