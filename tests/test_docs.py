"""Keep the user documentation honest: it must name what the code has and its examples must run.

* every registered method has a section in docs/methods.md listing each of its parameters with
  the default the code uses;
* every RunConfig key is in docs/configuration.md with its default;
* every ```python block in docs/*.md runs (and, when the text says it "prints" a ```text block,
  prints exactly that);
* every ``fedfair-med ...`` line in a ```bash block of README.md or docs/*.md names a registered
  command (and sub-command) and only options that command accepts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import shlex
from pathlib import Path

import pytest
import typer.main
import yaml

from fedfair_med.algorithms import REGISTRY
from fedfair_med.cli.main import app as cli_app
from fedfair_med.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def fenced_blocks(text: str, language: str) -> list[tuple[str, int]]:
    """(body, end offset) of every fenced block marked ``language``."""
    return [(m.group(2), m.end()) for m in FENCE.finditer(text) if m.group(1) == language]


def sections(text: str) -> dict[str, str]:
    """Level-2 heading → the text up to the next level-2 heading."""
    parts = re.split(r"^## ", text, flags=re.M)
    return {part.splitlines()[0].strip(): part for part in parts[1:]}


def method_section(text: str, name: str) -> str | None:
    """The section whose heading names the method as ``(`name`)``."""
    for heading, body in sections(text).items():
        if f"(`{name}`)" in heading:
            return body
    return None


def table_cell(section: str, key: str) -> str | None:
    """The second cell of the table row that starts with ``| `key` |``."""
    match = re.search(rf"^\|\s*`{re.escape(key)}`\s*\|([^|]*)\|", section, re.M)
    return match.group(1).strip() if match else None


def documented_default(value: object) -> str:
    """How a default is written in a table: JSON in backticks (`0.01`, `"uniform"`, `{}`)."""
    return f"`{json.dumps(value)}`"


# ---- methods.md ----------------------------------------------------------------------------
METHODS_MD = (DOCS / "methods.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_has_a_section_with_its_parameters_and_defaults(name: str) -> None:
    section = method_section(METHODS_MD, name)
    assert section is not None, f"docs/methods.md has no '## ... (`{name}`)' section"
    for param, default in REGISTRY[name].param_defaults().items():
        cell = table_cell(section, param)
        assert cell is not None, f"{name}: parameter `{param}` is not in its table"
        assert cell == documented_default(default), (
            f"{name}.{param}: docs say {cell}, code default is {documented_default(default)}")
    assert "Paper" in section, f"{name}: no paper reference"


def test_section_lookup_notices_a_missing_method_or_parameter() -> None:
    text = "## FedAvg (`fedavg`)\n\n| `mu` | `0.01` | x |\n\n## Other (`other`)\nno table\n"
    assert method_section(text, "fedprox") is None
    assert table_cell(method_section(text, "fedavg"), "mu") == "`0.01`"
    assert table_cell(method_section(text, "other"), "mu") is None


# ---- configuration.md ----------------------------------------------------------------------
CONFIGURATION_MD = (DOCS / "configuration.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(RunConfig)])
def test_every_config_key_is_documented_with_its_default(field: str) -> None:
    cell = table_cell(CONFIGURATION_MD, field)
    assert cell is not None, f"docs/configuration.md has no table row for `{field}`"
    default = getattr(RunConfig(), field)
    if default is None:
        assert cell in ("task default", "`null`"), f"{field}: default None documented as {cell}"
    else:
        assert cell == documented_default(default), (
            f"{field}: docs say {cell}, code default is {documented_default(default)}")


@pytest.mark.parametrize("index", range(len(fenced_blocks(CONFIGURATION_MD, "yaml"))))
def test_yaml_examples_are_valid_configurations(index: int) -> None:
    body, _ = fenced_blocks(CONFIGURATION_MD, "yaml")[index]
    config = load_config(yaml.safe_load(body))
    assert config.to_dict().keys() == RunConfig().to_dict().keys()


# ---- python blocks in docs/*.md --------------------------------------------------------------
def python_examples() -> list[tuple[str, int, str, str | None]]:
    """(file, index, code, expected stdout or None) for every ```python block in docs/."""
    out = []
    for path in sorted(DOCS.glob("*.md")):
        text = path.read_text(encoding="utf-8")
        for index, (code, end) in enumerate(fenced_blocks(text, "python")):
            after = text[end:]
            expected = None
            promise = re.match(r"\s*prints\s*\n+```text\n(.*?)^```", after, re.S | re.M)
            if promise:
                expected = promise.group(1)
            out.append((path.name, index, code, expected))
    return out


EXAMPLES = python_examples()


@pytest.mark.parametrize("doc,index,code,expected", EXAMPLES,
                         ids=[f"{doc}[{i}]" for doc, i, _, _ in EXAMPLES])
def test_python_examples_run(doc: str, index: int, code: str, expected: str | None,
                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # anything an example writes lands here
    registry = dict(REGISTRY)
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            exec(compile(code, f"{doc}[{index}]", "exec"), {"__name__": f"docs_example_{index}"})
    finally:  # an example may register a method; do not leak it into other tests
        REGISTRY.clear()
        REGISTRY.update(registry)
    if expected is not None:
        assert stdout.getvalue().strip() == expected.strip()


def test_examples_were_found() -> None:
    documented = {doc for doc, *_ in EXAMPLES}
    assert {"methods.md", "metrics.md", "configuration.md"} <= documented


# ---- fedfair-med commands in bash blocks -------------------------------------------------------
def cli_invocations(text: str) -> list[list[str]]:
    """The arguments after ``fedfair-med`` of every such command in the text's bash blocks."""
    found = []
    for body, _ in fenced_blocks(text, "bash"):
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("$ "):
                line = line[2:]
            if "fedfair-med" not in line:  # other shell (awk programs, loops) is not ours to parse
                continue
            for part in re.split(r"&&|\|\||;|\|", line):
                words = shlex.split(part, comments=True)
                if words and words[0] == "fedfair-med":
                    found.append(words[1:])
    return found


def cli_problem(args: list[str], root: object) -> str | None:
    """Why ``fedfair-med ARGS`` would be rejected as unknown usage, or None when it is known.

    Duck-typed on click's Group/Command (``commands``, ``params``): typer may vendor its own click.
    """
    command, path = root, ["fedfair-med"]
    rest = list(args)
    while hasattr(command, "commands") and rest and not rest[0].startswith("-"):
        word = rest.pop(0)
        sub = command.commands.get(word)
        if sub is None:
            return f"{' '.join(path)}: unknown command {word!r} (known: {sorted(command.commands)})"
        command, path = sub, [*path, word]
    options = {"--help"}
    for param in command.params:
        options.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("-"))
    for token in rest:
        name = token.split("=", 1)[0]
        if name.startswith("-") and not re.fullmatch(r"-\d+(\.\d+)?", name) and name not in options:
            return f"{' '.join(path)}: unknown option {name!r} (known: {sorted(options)})"
    return None


ROOT_COMMAND = typer.main.get_command(cli_app)
COMMAND_DOCS = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("path", COMMAND_DOCS, ids=[p.name for p in COMMAND_DOCS])
def test_documented_commands_exist(path: Path) -> None:
    problems = [f"{' '.join(args)} → {problem}"
                for args in cli_invocations(path.read_text(encoding="utf-8"))
                if (problem := cli_problem(args, ROOT_COMMAND))]
    assert not problems, "\n".join(problems)


def test_commands_are_found_in_the_docs() -> None:
    found = [args[0] for p in COMMAND_DOCS for args in cli_invocations(p.read_text(encoding="utf-8"))
             if args]
    assert {"demo", "simulate", "report"} <= set(found)


def test_command_check_rejects_unknown_commands_and_options() -> None:
    text = ("```bash\npip install -e . && fedfair-med simulate --lam 2 \\\n  --rounds 3\n"
            "fedfair-med frobnicate\n$ fedfair-med report run --no-such-flag\n```\n")
    invocations = cli_invocations(text)
    assert invocations == [["simulate", "--lam", "2", "--rounds", "3"], ["frobnicate"],
                           ["report", "run", "--no-such-flag"]]
    assert cli_problem(invocations[0], ROOT_COMMAND) is None
    assert "unknown command 'frobnicate'" in cli_problem(invocations[1], ROOT_COMMAND)
    assert "unknown option '--no-such-flag'" in cli_problem(invocations[2], ROOT_COMMAND)
