"""The one way a command reports an error it found itself: one line on stderr, exit code 1.

Exit codes (README "Exit codes"): 1 for such errors, 2 only for command lines the parser
rejects, 130 for Ctrl-C. ``typer.echo``, not Rich: Rich would wrap a long path, and an error must
read as one message.
"""

from __future__ import annotations

from typing import NoReturn

import typer


def fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)
