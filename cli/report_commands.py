"""``fedfair-med report RUN_DIR``: write report.json/.md/.html for a run and print its groups."""

from __future__ import annotations

from pathlib import Path

import typer


def _parse_edges(text: str) -> tuple[float, ...]:
    """'60' or '40,60' → (40.0, 60.0); strictly increasing."""
    try:
        edges = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--age-edges must be numbers separated by commas, got {text!r}") from None
    if not edges or list(edges) != sorted(set(edges)):
        raise ValueError(f"--age-edges must be strictly increasing, got {text!r}")
    return edges


def register(app: typer.Typer) -> None:
    """Attach the ``report`` command to ``app``."""

    @app.command("report")
    def report(
        run_dir: Path = typer.Argument(..., help="A run directory (holds run.yaml, metrics.jsonl, "
                                       "predictions.csv or report.json)."),
        min_group_size: int = typer.Option(10, "--min-group-size", min=1,
                                           help="Flag groups with fewer test samples than this."),
        age_edges: str = typer.Option("60", "--age-edges",
                                      help="Age-band edges, comma-separated (e.g. 40,60)."),
    ) -> None:
        """Write the fairness report (JSON, Markdown, self-contained HTML) of a run."""
        from rich.console import Console

        from fedfair_med.reporting.render import RunDirectoryError, print_summary, write_reports

        try:
            edges = _parse_edges(age_edges)
            paths = write_reports(run_dir, min_group_size=min_group_size, age_edges=edges)
        except (RunDirectoryError, ValueError, OSError) as error:
            # typer.echo, not Rich: Rich wraps long paths, and the error must stay on one line.
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(code=2) from None
        import json

        console = Console(highlight=False)
        print_summary(json.loads(paths["json"].read_text(encoding="utf-8")), console)
        if not (run_dir / "predictions.csv").exists():
            console.print("no predictions.csv (they stayed at the sites): rendered the existing "
                          "report.json; --min-group-size and --age-edges were not re-applied",
                          markup=False)
        for label, path in paths.items():
            console.print(f"{label}: {path}", markup=False)
