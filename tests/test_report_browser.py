"""report.html as a reader sees it: rendered by a real headless Chromium, not parsed as text.

A tiny real run (synthetic-cls, 2 rounds of 2 steps) writes its report; Chromium loads the file
offline and dumps the DOM it built and a screenshot. The DOM must hold the per-group rows and
the gap names, every chart must be an <img> whose base64 source decodes to a real PNG, and the
screenshot must not be blank. Without Chromium the test is skipped locally and fails in CI
(``CI`` set), where .ci/run installs it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedfair_med.config import RunConfig
from fedfair_med.runtime.local import run_simulation

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

BROWSER_TIMEOUT_S = 90
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed; .ci/run installs Debian's chromium package")
    pytest.skip("chromium is not installed (apt-get install chromium)")


def _browser(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium with a throwaway profile and nothing that reaches the network."""
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S,
                          check=False)


class _DomReader(HTMLParser):
    """Rows of the table with id="groups", cells of id="gaps", and every <img> src."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "table":
            self._table = attributes.get("id") or f"table{len(self.tables)}"
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(attributes.get("src") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict:
    chromium = _chromium()
    root = tmp_path_factory.mktemp("browser")
    config = RunConfig(name="browser", task="synthetic-cls", method="fedavg", rounds=2,
                       max_steps=2, data={"scale": 0.25})
    result = run_simulation(config, root / "run")
    html = result.path / "report.html"
    assert html.is_file()
    dom = _browser(chromium, root / "profile-dom", "--dump-dom", html.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    shot = root / "shot.png"
    screenshot = _browser(chromium, root / "profile-shot", f"--screenshot={shot}",
                          "--window-size=1280,2000", "--hide-scrollbars", html.as_uri())
    assert screenshot.returncode == 0, screenshot.stderr[-2000:]
    reader = _DomReader()
    reader.feed(dom.stdout)
    return {"dom": dom.stdout, "reader": reader, "shot": shot,
            "report": json.loads((result.path / "report.json").read_text()),
            "sites": sorted(result.predictions["site"].unique())}


def test_dom_shows_every_group_row_and_gap(rendered: dict) -> None:
    reader, report = rendered["reader"], rendered["report"]
    header, *rows = reader.tables["groups"]
    assert header[:3] == ["attribute", "group", "n"]
    shown = {(r[0], r[1]): r for r in rows}
    assert len(rows) == len(report["groups"])
    for group in report["groups"]:
        cells = shown[(group["attribute"], group["group"])]
        assert cells[2] == str(group["n"])
        assert cells[3] == f"{group['metric']:.4f}"
    site_rows = {r[1] for r in rows if r[0] == "site"}
    assert site_rows == set(rendered["sites"]) and len(site_rows) >= 2
    gap_names = [r[0] for r in reader.tables["gaps"][1:]]
    assert gap_names == list(report["gaps"]) and "ea" in gap_names


def test_dom_charts_are_embedded_pngs(rendered: dict) -> None:
    images = rendered["reader"].images
    attributes = {g["attribute"] for g in rendered["report"]["groups"]}
    assert len(images) == len(attributes) + 1  # one chart per attribute, plus training curves
    for source in images:
        assert source.startswith("data:image/png;base64,"), source[:60]
        data = base64.b64decode(source.split(",", 1)[1], validate=True)
        assert data.startswith(PNG_SIGNATURE)
        with Image.open(io.BytesIO(data)) as picture:
            picture.load()
            assert picture.width >= 200 and picture.height >= 150
            assert len(np.unique(np.asarray(picture.convert("L")))) > 10  # drawn, not an empty canvas
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*https?://", rendered["dom"], flags=re.I)


def test_screenshot_is_a_rendered_page(rendered: dict) -> None:
    shot = rendered["shot"]
    assert shot.is_file() and shot.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(shot) as picture:
        assert picture.size == (1280, 2000)
        pixels = np.asarray(picture.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    # Text and charts cover a real share of the page, not a stray pixel or two.
    assert (pixels.min(axis=2) < 200).mean() > 0.02
