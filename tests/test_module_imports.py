"""Every module of the package imports on its own (docs/architecture.md's floors and the absence
of import circles are checked from the source in tests/test_floors.py; this runs the imports)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def modules() -> list[str]:
    names = []
    for path in sorted((ROOT / "fedfair_med").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


@pytest.mark.parametrize("name", modules())
def test_every_module_imports(name: str) -> None:
    importlib.import_module(name)
