"""The build report: report.md and a self-contained report.html, checked in headless Chromium.

Chromium is Debian's ``chromium`` package; when /usr/bin/chromium is missing the
fixture runs scripts/ensure-chromium.sh (the Makefile's test target does too).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from helpers import REPO
from sdbuild.errors import SdbuildError
from sdbuild.report import write_report

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
MAGENTA = (255, 0, 255)  # the sample image's colour, looked for in the screenshot

# build.json of a chunked tiny build, as the executor writes it (trimmed to what a report reads).
BUILD = {
    "name": "tiny-chunked",
    "recipe_file": "recipes/tiny-chunked.yaml",
    "family": "sd",
    "sdbuild": "0.1.0",
    "platform": "Linux x86_64",
    "seconds": 174.9,
    "bundle_bytes": 1704805,
    "recipe": {
        "name": "tiny-chunked",
        "model": {"version": "synthetic:tiny-sd", "revision": "main"},
        "attention": "SPLIT_EINSUM",
        "resolution": {"height": 64, "width": 64},
        "target": "macOS14",
        "compute_unit": "CPU_AND_NE",
        "compression": {"nbits": 6, "components": ["unet"], "linear8": False, "mixed_bit": None},
        "chunk": {"unet": 2},
        "bundle": {"layout": "both"},
        "verify": {"psnr_min_db": 35.0, "samples": 2, "seed": 93},
        "controlnet": [],
    },
    "stages": [
        {"stage": "download", "component": None, "cache": "hit", "status": "cached", "seconds": 0.0, "build_seconds": 14.6, "peak_rss_bytes": 0, "bytes": 4699461},
        {"stage": "trace", "component": "unet", "cache": "hit", "status": "cached", "seconds": 0.0, "build_seconds": 20.6, "peak_rss_bytes": 0, "bytes": 3533932},
        {"stage": "convert", "component": "unet", "cache": "hit", "status": "cached", "seconds": 0.0, "build_seconds": 48.8, "peak_rss_bytes": 0, "bytes": 1943871},
        {"stage": "compress", "component": "unet", "cache": "miss", "status": "built", "seconds": 28.1, "build_seconds": 28.1, "peak_rss_bytes": 1063400000, "bytes": 1029036},
        {"stage": "chunk", "component": "unet", "cache": "miss", "status": "built", "seconds": 13.3, "build_seconds": 13.3, "peak_rss_bytes": 419000000, "bytes": 1035776},
        {"stage": "verify", "component": "text_encoder", "cache": "miss", "status": "built", "seconds": 21.1, "build_seconds": 21.1, "peak_rss_bytes": 430900000, "bytes": 313},
        {"stage": "verify", "component": "unet", "cache": "miss", "status": "built", "seconds": 92.4, "build_seconds": 92.4, "peak_rss_bytes": 510700000, "bytes": 701},
    ],
    "components": {
        "text_encoder": {"compressed": False, "float16_bytes": 161767, "package_bytes": 161767, "psnr": {"psnr_db": 69.86}},
        "unet": {
            "compressed": True,
            "float16_bytes": 1943871,
            "package_bytes": 1029036,
            "psnr": {"psnr_db": 38.61, "float16_psnr_db": 56.71, "vs_float16_psnr_db": 38.73, "chain_psnr_db": 200.42},
            "chunks": {
                "parts": [{"package_bytes": 509028, "weight_bytes": 323872}, {"package_bytes": 522187, "weight_bytes": 331520}],
                "crossing": [["x_3_cast_fp16", "input0_4_cast_fp16", "var_507_cast_fp16", "x_31_cast_fp16", "x_45_cast_fp16"]],
            },
        },
        "vae_decoder": {"compressed": False, "float16_bytes": 498456, "package_bytes": 498456, "psnr": {"psnr_db": 34.2}},
    },
    "compression_plot": "analysis.png",
    "sample_image": {"path": "samples/sample-93.png", "prompt": "a photo of an astronaut", "seed": 93, "steps": 4},
    "notes": ["compile skipped: Apple's coremlcompiler needs macOS with Xcode tools; the bundle keeps .mlpackage files"],
    "versions": {"coremltools": "9.0", "torch": "2.13.0+cpu", "python": "3.11.7"},
}


@pytest.fixture
def build_dir(tmp_path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    folder = tmp_path / "builds" / "tiny-chunked"
    (folder / "samples").mkdir(parents=True)
    (folder / "build.json").write_text(json.dumps(BUILD, indent=2))
    fig, ax = plt.subplots(figsize=(5, 3), dpi=80)
    ax.plot([2, 4, 6, 8], [22.0, 31.5, 38.6, 44.0], marker="o")
    ax.set_xlabel("bits per weight")
    ax.set_ylabel("PSNR (dB)")
    fig.tight_layout()
    fig.savefig(folder / "analysis.png")
    plt.close(fig)
    Image.new("RGB", (96, 96), MAGENTA).save(folder / "samples" / "sample-93.png")
    return folder


@pytest.fixture(scope="session")
def chromium() -> str:
    def find():
        for name in ("chromium", "chromium-browser", "google-chrome"):
            path = shutil.which(name)
            if path:
                return path
        mac = "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome"
        return mac if os.path.exists(mac) else None

    if find() is None and platform.system() == "Linux":
        subprocess.run(["sh", str(REPO / "scripts" / "ensure-chromium.sh")], check=False, timeout=900)
    path = find()
    if path is None:
        if platform.system() == "Linux":
            pytest.fail("no Chromium: scripts/ensure-chromium.sh could not install Debian's chromium package")
        pytest.skip("no Chromium on this machine")
    return path


def run_chromium(chromium: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    env = dict(os.environ, HOME=str(tmp_path))
    done = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


class _Tables(HTMLParser):
    """Rows of every <table id=...> in a document, as lists of cell texts."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table = None
        self._row = None
        self._cell = None
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id", f"table{len(self.tables)}"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(attrs.get("src", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_markdown_report(build_dir):
    _html, md = write_report(build_dir)
    text = md.read_text()
    assert text.startswith("# sdbuild report: tiny-chunked\n")
    assert "| stage | component | cache | seconds | built in (s) | peak RSS | output |" in text
    assert "| compress | unet | built | 28.1 | 28.1 | 1014.1 MB | 1004.9 KB |" in text
    assert "| trace | unet | cached |  | 20.6 |  | 3.4 MB |" in text
    assert "| unet | 38.6 | 56.7 | 38.7 | 200.4 (identical) |" in text
    assert "| text_encoder | 69.9 | 69.9 | same package | – |" in text  # uncompressed: shipped is the float16 package
    assert "| unet | 1.9 MB | 1004.9 KB | 53% | yes | 497.1 KB + 509.9 KB |" in text
    assert "| chunk 1 | 316.3 KB | 497.1 KB | x_3_cast_fp16, input0_4_cast_fp16, var_507_cast_fp16, x_31_cast_fp16, x_45_cast_fp16 |" in text
    assert "![Compression](analysis.png)" in text
    assert "![Sample image](samples/sample-93.png)" in text
    assert "prompt: a photo of an astronaut, seed: 93, steps: 4" in text
    assert "| chunk 2 | 323.8 KB | 509.9 KB | (last part) |" in text
    assert "- compile skipped: Apple's coremlcompiler" in text
    assert "| model | synthetic:tiny-sd |" in text and "| compression | 6-bit palettization (unet) |" in text


def test_html_report_is_self_contained(build_dir):
    html, _md = write_report(build_dir)
    text = html.read_text()
    assert "://" not in text  # nothing to fetch: no http(s), no file URLs
    assert not re.search(r"<(link|script|iframe)\b", text)
    parser = _Tables()
    parser.feed(text)
    assert len(parser.images) == 2 and all(src.startswith("data:image/png;base64,") for src in parser.images)
    # vae_decoder's 34.2 dB is below the recipe's 35 dB floor: its row is marked.
    assert re.search(r'<tr class="fail"><td>vae_decoder</td>', text)


def test_missing_image_is_a_note_not_a_failure(build_dir):
    (build_dir / "analysis.png").unlink()
    html, md = write_report(build_dir)
    assert "Compression: analysis.png is missing" in md.read_text()
    assert html.read_text().count("data:image/png;base64,") == 1


def test_not_a_build_folder(tmp_path):
    with pytest.raises(SdbuildError, match="no build.json"):
        write_report(tmp_path)


def test_report_renders_in_headless_chromium(build_dir, chromium, tmp_path):
    from PIL import Image

    html, _md = write_report(build_dir)
    url = html.resolve().as_uri()
    dom = run_chromium(chromium, tmp_path, "--dump-dom", url).stdout
    tables = _Tables()
    tables.feed(dom)
    stages = tables.tables["stages"]
    assert stages[0] == ["stage", "component", "cache", "seconds", "built in (s)", "peak RSS", "output"]
    assert [r[:3] for r in stages[1:]] == [[s["stage"], s["component"] or "", {"hit": "cached", "miss": "built"}[s["cache"]]] for s in BUILD["stages"]]
    psnr = tables.tables["psnr"]
    assert psnr[0][0] == "component" and "shipped vs PyTorch fp32" in psnr[0] and "shipped vs float16 package" in psnr[0]
    assert {r[0]: r[1] for r in psnr[1:]} == {"text_encoder": "69.9", "unet": "38.6", "vae_decoder": "34.2"}
    assert "chunks-unet" in tables.tables and "sizes" in tables.tables

    shot = tmp_path / "report.png"
    run_chromium(chromium, tmp_path, "--window-size=1200,2600", f"--screenshot={shot}", url)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2600)
    colours = {c for _n, c in image.getcolors(maxcolors=1 << 20)}
    assert MAGENTA in colours, "the sample image (a data URI) did not render"
    assert len(colours) > 50, "the screenshot looks blank"
    keep = os.environ.get("SDBUILD_REPORT_SCREENSHOT")
    if keep:  # to look at the rendering by eye
        shutil.copyfile(shot, keep)
