"""``fedfair-med data``: check a site manifest, import public datasets as manifests.

Thin by design: parse arguments, call :mod:`fedfair_med.data`, print. Problems are printed one
per line (file, row, field, message) so a data manager can work through them; exit code 1
means "fix these first". Expected failures (a bad manifest, an unreadable folder) never
produce a traceback.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from fedfair_med.data.importers import IMPORTERS, DatasetLayoutError, import_dataset
from fedfair_med.data.manifest import SHOWN_PROBLEMS, ManifestError, Problem, parse_manifest, problem_lines
from fedfair_med.data.validate import TASK_FORMATS, CheckResult, check_manifest, task_format

TaskName = Enum("TaskName", {name: name for name in TASK_FORMATS}, type=str)  # type: ignore[misc]
DatasetName = Enum("DatasetName", {**{name.replace("-", "_"): name for name in IMPORTERS},  # type: ignore[misc]
                                   "dicom": "dicom"}, type=str)


def _console() -> Console:
    # soft_wrap keeps each problem on one line, whatever the terminal width.
    return Console(soft_wrap=True, highlight=False)


def _print_problems(console: Console, title: str, problems: list[Problem], style: str,
                    limit: int | None = SHOWN_PROBLEMS) -> None:
    """The title, then the first ``limit`` problems and one line counting the rest by kind."""
    console.print(f"[{style}]{title}[/{style}]")
    for line in problem_lines(problems, limit):
        console.print(line, markup=False)


def _summary_tables(result: CheckResult) -> list[Table]:
    summary = result.summary
    splits = ("train", "val", "test")
    counts = Table(title=f"site '{summary.site}' ({summary.task_kind}): {summary.total} rows")
    counts.add_column("")
    for split in splits:
        counts.add_column(split, justify="right")
    counts.add_row("rows", *(str(summary.split_counts.get(s, 0)) for s in splits))
    if summary.class_counts:
        classes = sorted({c for per_split in summary.class_counts.values() for c in per_split})
        for cls in classes:
            counts.add_row(f"class {cls}", *(str(summary.class_counts.get(s, {}).get(cls, 0)) for s in splits))
    if summary.foreground_fraction:
        counts.add_row("mean foreground", *(
            f"{summary.foreground_fraction[s]:.1%}" if s in summary.foreground_fraction else "-" for s in splits))
    tables = [counts]
    for attribute, groups in summary.group_counts.items():
        table = Table(title=f"groups of '{attribute}'")
        table.add_column(attribute)
        for split in splits:
            table.add_column(split, justify="right")
        for group, per_split in groups.items():
            table.add_row(group, *(str(per_split.get(s, 0)) for s in splits))
        tables.append(table)
    sizes = Table(title="image sizes")
    sizes.add_column("size")
    sizes.add_column("images", justify="right")
    for size, n in summary.image_sizes.items():
        sizes.add_row(size, str(n))
    tables.append(sizes)
    return tables


def check(
    manifest: Path = typer.Argument(..., help="The site's manifest CSV."),
    task: TaskName = typer.Option(..., "--task", help="The task the site's data is for."),
    mask_threshold: int = typer.Option(127, help="8-bit mask values above this are foreground."),
    audit: bool = typer.Option(False, "--audit",
                               help="The manifest is only used to audit a model (report --model): "
                                    "test rows suffice, no train rows needed."),
    show: int = typer.Option(SHOWN_PROBLEMS, "--show", min=0,
                             help="Problems listed one per line; the rest are counted by kind (0: all)."),
) -> None:
    """Open every file of a site manifest; print a summary, or the problems found (exit 1)."""
    limit = show or None
    console = _console()
    spec = task_format(task.value)
    try:
        parsed, parse_problems = parse_manifest(manifest)
        result = check_manifest(parsed, task_kind=spec.kind, image_format=spec.image_format,
                                mask_threshold=mask_threshold, classes=spec.classes, audit=audit)
    except ManifestError as exc:
        _print_problems(console, f"{manifest}: cannot be read as a manifest", exc.problems, "bold red", limit)
        raise typer.Exit(1) from None
    except OSError as exc:
        console.print(f"{manifest}: {exc}", markup=False)
        raise typer.Exit(1) from None
    problems = list(dict.fromkeys([*parse_problems, *result.problems]))
    warnings = list(result.warnings)
    if parsed.task and parsed.task != task.value:
        warnings.append(Problem(str(manifest), None, None,
                                f"the file says '# task: {parsed.task}' but it was checked as '{task.value}'"))
    if warnings:
        _print_problems(console, f"{len(warnings)} warning(s):", warnings, "yellow", limit)
    if problems:
        _print_problems(console, f"{len(problems)} problem(s):", problems, "bold red", limit)
        raise typer.Exit(1)
    for table in _summary_tables(result):
        console.print(table)
    console.print(f"[green]{manifest}: OK[/green] ({result.summary.total} rows checked)")


def import_(
    dataset: DatasetName = typer.Argument(..., help="Which public dataset SRC holds."),
    src: Path = typer.Argument(..., help="The dataset's folder, as published."),
    out: Path = typer.Option(..., "--out", help="Where to write <site>/manifest.csv."),
    test_fraction: Optional[float] = typer.Option(
        None, "--test-fraction", help="Share of images (or patients/videos/lesions) for test; "
                                      "default per dataset, see docs/data.md."),
    val_fraction: Optional[float] = typer.Option(
        None, "--val-fraction", help="Share of the non-test groups (children, images, videos, lesions) "
                                     "held out for validation/model selection; 0 = none. Default "
                                     "0.15 (CVC-ClinicDB: as many videos as test). Test is unaffected."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split's shuffles."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N images per split (quick tests)."),
    force: bool = typer.Option(False, "--force", help="Replace existing manifests whose content "
                                                      "(e.g. the split) would change."),
) -> None:
    """Write one manifest per site for a public dataset, pointing at SRC (nothing is copied).

    Manifests are written beside OUT first; one that would replace an existing, different
    manifest (another seed or fraction changes the test split under runs already made on it)
    is refused without --force, and then nothing is written.
    """
    import os
    import shutil

    if dataset.value == "dicom":  # a hospital's own series: one manifest, at OUT itself
        _import_dicom(src, out, test_fraction, val_fraction, seed, force)
        return
    console = _console()
    staging = out / f".import-{os.getpid()}"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        written = import_dataset(dataset.value, src, staging, test_fraction=test_fraction, seed=seed,
                                 limit=limit, val_fraction=val_fraction)
        targets = {site.site: out / site.manifest.relative_to(staging) for site in written}
        changed = [name for site in written for name in [site.site]
                   if targets[name].exists() and targets[name].read_bytes() != site.manifest.read_bytes()]
        if changed and not force:
            shutil.rmtree(staging, ignore_errors=True)
            console.print(f"error: {', '.join(str(targets[n]) for n in changed)} already exist(s) "
                          "with other content (another split would change the test set under "
                          "runs already made); use another --out, or --force to replace",
                          markup=False)
            raise typer.Exit(1)
        for site in written:
            targets[site.site].parent.mkdir(parents=True, exist_ok=True)
            derived = site.manifest.parent / "fov"  # masks the importer derived (fundus)
            if derived.is_dir():
                shutil.rmtree(targets[site.site].parent / "fov", ignore_errors=True)
                os.replace(derived, targets[site.site].parent / "fov")
            os.replace(site.manifest, targets[site.site])
    except (DatasetLayoutError, ValueError, OSError) as exc:
        console.print(f"cannot import {dataset.value} from {src}: {exc}", markup=False)
        raise typer.Exit(1) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for site in written:
        counts = ", ".join(f"{n} {split}" for split, n in site.split_counts.items() if n)
        state = " (replaced)" if site.site in changed else ""
        console.print(f"wrote {targets[site.site]}{state} (site '{site.site}', task {site.task}: "
                      f"{counts})", markup=False)


def _import_dicom(src: Path, out: Path, test_fraction: Optional[float], val_fraction: Optional[float],
                  seed: int, force: bool) -> None:
    """``data import dicom DIR --out sites/X``: OUT/manifest.csv from the series' headers
    (fedfair_med/data/dicom.py); every problem one line, exit 1, nothing written."""
    import os
    import tempfile

    from fedfair_med.data.dicom import DicomImportError, import_dicom

    console = _console()
    target = out / "manifest.csv"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".import-") as staging:
        try:
            written, counts, warnings = import_dicom(
                src, Path(staging) / out.name, test_fraction=0.25 if test_fraction is None else test_fraction,
                val_fraction=val_fraction or 0.0, seed=seed, site=out.name)
        except DicomImportError as exc:
            console.print(f"[bold red]cannot import DICOM series from {src}: {len(exc.problems)} "
                          "problem(s):[/bold red]")
            for line in exc.problems:
                console.print(line, markup=False)
            raise typer.Exit(1) from None
        for line in warnings:
            console.print(line, markup=False, style="yellow")
        if target.exists() and target.read_bytes() != written.read_bytes() and not force:
            console.print(f"error: {target} already exists with other content; use another --out, "
                          "or --force to replace", markup=False)
            raise typer.Exit(1)
        os.replace(written, target)
    shown = ", ".join(f"{n} {split}" for split, n in counts.items() if n)
    console.print(f"wrote {target} (site '{out.name}', task mri: {shown})", markup=False)


def derive_mri(
    image: Path = typer.Argument(..., help="A NIfTI MRI volume."),
    label: Path = typer.Argument(..., help="Its label map (NIfTI, same grid)."),
    out: Path = typer.Option(..., "--out", help="Where to write <site>/manifest.csv and volumes."),
    sites: int = typer.Option(3, "--sites", help="How many derived hospitals."),
    organ: str = typer.Option("liver", "--organ", help="Label name or value to segment."),
    seed: int = typer.Option(0, "--seed"),
    volumes_per_site: int = typer.Option(4, "--volumes-per-site", help="Derived volumes per hospital."),
    val_per_site: int = typer.Option(0, "--val-per-site",
                                     help="Volumes per hospital held out for validation (sweeps need >= 1)."),
) -> None:
    """Derive a small multi-site MRI federation (intensity, resolution, orientation shifts)."""
    from fedfair_med.data.mri_sites import derive_mri_federation

    console = _console()
    try:
        target = int(organ) if organ.isdigit() else organ
        manifests = derive_mri_federation(image, label, out, sites=sites, seed=seed, organ=target,
                                          volumes_per_site=volumes_per_site, val_per_site=val_per_site)
    except (KeyError, ValueError, OSError) as exc:
        console.print(f"cannot derive MRI sites from {image}: {exc}", markup=False)
        raise typer.Exit(1) from None
    for manifest in manifests:
        console.print(f"wrote {manifest}", markup=False)


def deal(
    manifests: list[Path] = typer.Argument(..., help="Site manifests whose rows are re-dealt."),
    out: Path = typer.Option(..., "--out", help="Where to write <site>/manifest.csv."),
    sites: int = typer.Option(..., "--sites", help="How many sites; 1 pools every row into one."),
    seed: int = typer.Option(0, "--seed", help="Seed of the shuffle within each split."),
    prefix: Optional[str] = typer.Option(
        None, "--prefix", help="Site name ('pooled' for one site), numbered for several "
                               "(default 'iid': iid0, iid1, ...)."),
    task: Optional[TaskName] = typer.Option(None, "--task", help="When the manifests declare none."),
    force: bool = typer.Option(False, "--force", help="Replace manifests already there."),
) -> None:
    """Deal the rows of site manifests into new sites: one pooled site, or N equal IID sites.

    A diagnostic for slow federations on data you already hold (a public dataset): pooled
    training tests the pipeline, IID sites test the averaging, the real sites add their split.
    Each row keeps its split, label and attributes; the rows of each split are dealt in turn.
    """
    from fedfair_med.data.deal import DealError, deal_sites

    console = _console()
    name = prefix or ("pooled" if sites == 1 else "iid")
    try:
        written = deal_sites(manifests, out, sites=sites, seed=seed, prefix=name,
                             task=task.value if task else None, force=force)
    except ManifestError as exc:
        _print_problems(console, "cannot read a source manifest:", list(exc.problems), "bold red")
        raise typer.Exit(1) from None
    except (DealError, ValueError, OSError) as exc:
        console.print(f"error: {exc}", markup=False)
        raise typer.Exit(1) from None
    for path in written:
        console.print(f"wrote {path}", markup=False)


def register(app: typer.Typer) -> None:
    """Attach the ``data`` command group to the main app."""
    data_app = typer.Typer(help="Site manifests: check them, import public datasets.", no_args_is_help=True)
    data_app.command("check")(check)
    data_app.command("import")(import_)
    data_app.command("derive-mri")(derive_mri)
    data_app.command("deal")(deal)
    app.add_typer(data_app, name="data")
