"""Site manifests: the one CSV a hospital writes to describe its data.

Hospitals write these files by hand, so the parser is forgiving about layout (blank lines,
spaces around values, column-name case, ``M``/``f``/``Female`` for sex) and strict about
meaning: every problem it finds is collected and reported together, each naming the file, the
line and the column, so a data manager can fix a whole file in one pass.

Format (``docs/data.md`` has an example)::

    # site: hospital-a          <- optional leading comment lines
    # task: polyp
    id,image,label,split,fov,sex,age
    p001,images/p001.png,masks/p001.png,train,,F,54

* ``id`` — unique per file; ``image`` — a path; ``label`` — a mask path (segmentation) or a class
  (classification); ``split`` — ``train``/``val``/``test`` (any case); ``fov`` — optional
  region-of-interest mask path.
* Paths are relative to the manifest's folder; absolute paths are kept as they are.
* Every other column is a sensitive attribute. ``sex`` is normalised to ``male``/``female``;
  ``age`` must be a number of years in 0–120. A blank cell (or ``unknown``, ``NA``, ``NaN``…
  for sex and age) is *missing*: kept as ``""`` and reported as a warning, not an error,
  because incomplete metadata is normal and such samples simply fall out of fairness groups.
* Column names are case-insensitive and read in lower case.

:func:`load_manifest` only parses and runs cheap checks; opening images is
:func:`fedfair_med.data.validate.check_manifest`'s job.
"""

from __future__ import annotations

import collections
import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

REQUIRED_COLUMNS = ("id", "image", "label", "split")
OPTIONAL_PATH_COLUMNS = ("fov",)
SPLITS = ("train", "val", "test")
AGE_RANGE = (0.0, 120.0)
SEX_VALUES = {"m": "male", "male": "male", "f": "female", "female": "female"}
#: Spellings of "not recorded" accepted for sex and age; they become "".
MISSING_TOKENS = frozenset({"", "unknown", "unk", "na", "n/a", "nan", "none", "null", "missing", "?", "-"})
#: Row numbers listed in one aggregated warning before "… and N more".
_MAX_LISTED_ROWS = 8

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_COMMENT_KEY = re.compile(r"^#\s*(site|task)\s*:\s*(.*?)\s*$", re.IGNORECASE)


#: HAM10000 / ISIC diagnosis codes: melanoma, basal-cell carcinoma and actinic keratosis (incl.
#: intra-epithelial carcinoma) are the malignant class — the one place this fact lives.
HAM10000_MALIGNANT = ("mel", "bcc", "akiec")
HAM10000_BENIGN = ("nv", "bkl", "df", "vasc")


@dataclass(frozen=True)
class Problem:
    """One finding about a manifest; ``row`` is the CSV line number, ``field`` the column."""

    file: str
    row: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = [self.file]
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        return f"{', '.join(where)}: {self.message}"


#: Problems shown one per line before the rest are only counted (``data check --show``).
SHOWN_PROBLEMS = 20


def problem_lines(problems: Sequence[Problem], limit: int | None = SHOWN_PROBLEMS) -> list[str]:
    """The first ``limit`` problems, one line each, then one line counting the rest by kind.

    A manifest with 100,000 bad rows gives 21 lines, not 100,000 (``limit=None``: all)."""
    problems = list(problems)
    if limit is None or len(problems) <= limit:
        return [str(p) for p in problems]
    rest = problems[limit:]
    kinds = collections.Counter(_problem_kind(p) for p in rest)
    common = "; ".join(f"{n:,} × {kind}" for kind, n in kinds.most_common(3))
    more = f"; {len(kinds) - 3} other kind(s)" if len(kinds) > 3 else ""
    return [*(str(p) for p in problems[:limit]),
            f"… and {len(rest):,} more problem(s) ({len(problems):,} in all; first {limit} shown): {common}{more}"]


def _problem_kind(problem: Problem) -> str:
    """A problem's message with its particulars (paths, numbers, quoted values) blanked."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", problem.message)
    text = re.sub(r"\S*[/\\]\S*\.\w+|(?<!\w)/\S+", "…", text)
    text = re.sub(r"\d+(\.\d+)?", "N", text)
    return f"{problem.field}: {text}" if problem.field else text


def _delimiter_hint(header_cells: Sequence[str]) -> str:
    """A hint when the header is one cell holding another delimiter (a spreadsheet's export)."""
    if len(header_cells) != 1:
        return ""
    for delimiter, name in ((";", "semicolon"), ("\t", "tab"), ("|", "pipe")):
        if delimiter in header_cells[0]:
            return (f"; the header looks {name}-separated ({header_cells[0].strip()!r}): a manifest "
                    "is comma-separated — re-save it as CSV with commas")
    return ""


class ManifestError(ValueError):
    """A manifest that cannot be used; ``problems`` lists every reason, not just the first.

    Its message shows the first :data:`SHOWN_PROBLEMS` and counts the rest."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(problem_lines(self.problems)))

    def __str__(self) -> str:
        return "\n".join(problem_lines(self.problems))


@dataclass(frozen=True)
class ManifestRow:
    """One sample. ``image``/``fov`` are resolved against the manifest's folder."""

    id: str
    image: Path
    label: str
    split: str
    fov: Path | None
    attributes: dict[str, str]
    line: int
    folder: Path = Path(".")  # the manifest's folder, against which ``label`` paths resolve

    def __hash__(self) -> int:  # attributes is a dict; rows are identified by file line
        return hash((self.id, self.line))

    @property
    def label_path(self) -> Path:
        """``label`` read as a mask path (segmentation), resolved like ``image``."""
        return _resolve(self.label, self.folder)


@dataclass
class Manifest:
    """A parsed site manifest. ``warnings`` hold non-fatal findings (e.g. missing age)."""

    path: Path
    site: str
    rows: list[ManifestRow]
    attribute_names: tuple[str, ...]
    warnings: list[Problem] = field(default_factory=list)
    task: str | None = None

    def split(self, name: str) -> list[ManifestRow]:
        """Rows of one split (``train``, ``val`` or ``test``), in file order."""
        key = name.strip().lower()
        if key not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return [row for row in self.rows if row.split == key]

    def attribute_values(self, attribute: str, split: str | None = None) -> list[str]:
        """Per-row values of one attribute ('' when missing), without opening any image."""
        rows = self.rows if split is None else self.split(split)
        return [row.attributes.get(attribute, "") for row in rows]


# ---- value normalisation -------------------------------------------------------------------
def normalise_sex(raw: str) -> tuple[str, str | None]:
    """``(value, error)``: ``M``/``male``/``F``/``Female``… → ``male``/``female``; missing → ``""``."""
    text = raw.strip()
    if text.lower() in MISSING_TOKENS:
        return "", None
    value = SEX_VALUES.get(text.lower())
    if value is None:
        return text, f"{text!r} is not a known sex; use male/female (or M/F), blank if unknown"
    return value, None


def normalise_age(raw: str) -> tuple[str, str | None]:
    """``(value, error)``: a number of years in 0–120, written without a trailing ``.0``."""
    text = raw.strip()
    if text.lower() in MISSING_TOKENS:
        return "", None
    try:
        years = float(text)
    except ValueError:
        return text, f"{text!r} is not a number"
    if not math.isfinite(years) or not AGE_RANGE[0] <= years <= AGE_RANGE[1]:
        return text, f"{text!r} is out of range {AGE_RANGE[0]:g}-{AGE_RANGE[1]:g} years"
    return (f"{years:.0f}" if years.is_integer() else f"{years:g}"), None


def _normalise_attribute(name: str, raw: str) -> tuple[str, str | None]:
    if name == "sex":
        return normalise_sex(raw)
    if name == "age":
        return normalise_age(raw)
    return raw.strip(), None


# ---- reading -------------------------------------------------------------------------------
def _read_text(path: Path, shown: str) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError([Problem(shown, None, None, "file not found")]) from None
    except IsADirectoryError:
        raise ManifestError([Problem(shown, None, None, "is a folder, not a CSV file")]) from None
    except OSError as exc:
        raise ManifestError([Problem(shown, None, None, f"cannot read: {exc.strerror or exc}")]) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ManifestError([Problem(
            shown, line, None,
            f"not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as 'CSV UTF-8'",
        )]) from None


def _split_preamble(text: str) -> tuple[dict[str, str], int, str]:
    """Leading blank and ``#`` lines: their ``site``/``task`` keys, how many, and the rest."""
    keys: dict[str, str] = {}
    position, consumed = 0, 0
    while position < len(text):
        match = _LINE_BREAK.search(text, position)
        end = match.end() if match else len(text)
        line = text[position: match.start() if match else len(text)]
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break
        key = _COMMENT_KEY.match(stripped)
        if key and key.group(2):
            keys.setdefault(key.group(1).lower(), key.group(2))
        position, consumed = end, consumed + 1
    return keys, consumed, text[position:]


def _default_site(path: Path) -> str:
    """``hospital-a/manifest.csv`` → ``hospital-a``; ``hospital-a.csv`` → ``hospital-a``."""
    if path.stem.lower() == "manifest" and path.parent.name:
        return path.parent.name
    return path.stem


def _resolve(raw: str, folder: Path) -> Path:
    candidate = Path(raw)
    return candidate if candidate.is_absolute() else folder / candidate


def _rows_listed(lines: Sequence[int]) -> str:
    shown = ", ".join(str(n) for n in lines[:_MAX_LISTED_ROWS])
    more = len(lines) - _MAX_LISTED_ROWS
    return f"{shown} and {more} more" if more > 0 else shown


def parse_manifest(path: str | Path, *, site: str | None = None) -> tuple[Manifest, list[Problem]]:
    """Parse a manifest and return it with every problem found (the lenient form).

    Rows with problems are kept when they still have an id and an image, so image checks can
    run on them too; :func:`load_manifest` is the strict form that raises instead.
    Raises :class:`ManifestError` only when the file cannot be read as a table at all.
    """
    path = Path(path)
    shown = str(path)
    text = _read_text(path, shown)
    keys, preamble_lines, body = _split_preamble(text)
    problems: list[Problem] = []
    warnings: list[Problem] = []

    reader = csv.reader(io.StringIO(body, newline=""), skipinitialspace=False, strict=False)
    records: list[tuple[int, list[str]]] = []
    previous_end = 0
    try:
        for record in reader:
            start = preamble_lines + previous_end + 1
            previous_end = reader.line_num
            if not record or all(not cell.strip() for cell in record):
                continue
            records.append((start, record))
    except csv.Error as exc:
        raise ManifestError([Problem(shown, preamble_lines + reader.line_num, None,
                                     f"not a readable CSV table: {exc}")]) from None

    if not records:
        raise ManifestError([Problem(shown, None, None,
                                     "no header row; expected columns " + ",".join(REQUIRED_COLUMNS))])

    header_line, header_cells = records[0]
    header = [cell.strip().lower() for cell in header_cells]
    fatal: list[Problem] = []
    for index, name in enumerate(header):
        if not name:
            fatal.append(Problem(shown, header_line, None,
                                 f"column {index + 1} of the header has no name (a stray comma?)"))
        elif header.index(name) != index:
            fatal.append(Problem(shown, header_line, name, "column appears more than once in the header"))
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        fatal.append(Problem(shown, header_line, None,
                             f"missing required column(s) {', '.join(missing)}; "
                             f"the header must include {','.join(REQUIRED_COLUMNS)}"
                             f"{_delimiter_hint(header_cells)}"))
    if fatal:
        raise ManifestError(fatal)

    attribute_names = tuple(n for n in header if n not in REQUIRED_COLUMNS and n not in OPTIONAL_PATH_COLUMNS)
    folder = path.parent
    rows: list[ManifestRow] = []
    first_line_of_id: dict[str, int] = {}
    image_seen: dict[Path, tuple[int, str]] = {}
    missing_values: dict[str, list[int]] = {name: [] for name in attribute_names}

    for line, record in records[1:]:
        if len(record) != len(header):
            problems.append(Problem(shown, line, None,
                                    f"has {len(record)} values but the header has {len(header)} columns"))
        cells = {name: (record[i].strip() if i < len(record) else "") for i, name in enumerate(header)}
        row_ok = True
        for column in REQUIRED_COLUMNS:
            if not cells[column]:
                problems.append(Problem(shown, line, column, "is empty"))
                row_ok = False
        split = cells["split"].lower()
        if cells["split"] and split not in SPLITS:
            problems.append(Problem(shown, line, "split",
                                    f"{cells['split']!r} is not a split; use train, val or test"))
        sample_id = cells["id"]
        if sample_id:
            if sample_id in first_line_of_id:
                problems.append(Problem(shown, line, "id",
                                        f"duplicate id {sample_id!r} (first used on row {first_line_of_id[sample_id]})"))
            else:
                first_line_of_id[sample_id] = line
        attributes: dict[str, str] = {}
        for name in attribute_names:
            value, error = _normalise_attribute(name, cells[name])
            if error:
                problems.append(Problem(shown, line, name, error))
            elif value == "":
                missing_values[name].append(line)
            attributes[name] = value
        if not (sample_id and cells["image"]):
            continue
        image = _resolve(cells["image"], folder)
        if row_ok and split in SPLITS:
            earlier = image_seen.get(image)
            if earlier is not None and earlier[1] != split:
                problems.append(Problem(shown, line, "image",
                                        f"{cells['image']!r} is also listed on row {earlier[0]} in split "
                                        f"'{earlier[1]}': one image in two splits leaks test data"))
            elif earlier is not None:
                warnings.append(Problem(shown, line, "image",
                                        f"{cells['image']!r} is also listed on row {earlier[0]}"))
            else:
                image_seen[image] = (line, split)
        fov = _resolve(cells["fov"], folder) if cells.get("fov") else None
        rows.append(ManifestRow(id=sample_id, image=image, label=cells["label"], split=split,
                                fov=fov, attributes=attributes, line=line, folder=folder))

    for name, lines in missing_values.items():
        if lines:
            warnings.append(Problem(
                shown, None, name,
                f"no value in {len(lines)} row(s) (rows {_rows_listed(lines)}); those samples "
                f"have no '{name}' group and are left out of fairness statistics for it",
            ))

    manifest = Manifest(path=path, site=site or keys.get("site") or _default_site(path), rows=rows,
                        attribute_names=attribute_names, warnings=warnings, task=keys.get("task"))
    return manifest, problems


def load_manifest(path: str | Path, *, site: str | None = None) -> Manifest:
    """Parse a site manifest; raise :class:`ManifestError` listing every problem found.

    ``site`` overrides the ``# site:`` comment, which overrides the folder / file name.
    """
    manifest, problems = parse_manifest(path, site=site)
    if problems:
        raise ManifestError(problems)
    return manifest


# ---- writing -------------------------------------------------------------------------------
def write_manifest(
    path: str | Path,
    rows: Iterable[Mapping[str, object]],
    *,
    attribute_names: Sequence[str] = (),
    site: str | None = None,
    task: str | None = None,
    comments: Sequence[str] = (),
) -> Path:
    """Write rows (dicts with id, image, label, split, optional fov, attributes) as a manifest.

    Paths are written as given (``str``), so importers can point at data where it lies.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    with_fov = any(row.get("fov") for row in rows)
    columns = [*REQUIRED_COLUMNS, *(("fov",) if with_fov else ()), *attribute_names]
    with path.open("w", encoding="utf-8", newline="") as handle:
        if site:
            handle.write(f"# site: {site}\n")
        if task:
            handle.write(f"# task: {task}\n")
        for comment in comments:
            for line in _LINE_BREAK.split(comment):
                handle.write(f"# {line}\n")
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else str(row.get(c)) for c in columns])
    return path
