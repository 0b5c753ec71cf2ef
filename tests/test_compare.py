"""The variant comparison page (sdbuild compare): the Pareto front, the page in headless Chromium,
and a small matrix build of joint-compression variants that writes the page by itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import assert_one_line_error, run_cli, run_cli_here, write_recipe
from sdbuild.compare import pareto_front, write_compare
from tests.test_report import _Tables, chromium, run_chromium  # noqa: F401  (chromium is a fixture)

# name: (compression, bundle bytes, unet bytes, unet PSNR, sample colour)
VARIANTS = {
    "v-fp16": (None, 2_400_000, 1_940_000, 60.2, (255, 0, 255)),
    "v-6bit": ({"nbits": 6}, 1_200_000, 740_000, 44.1, (0, 200, 0)),
    "v-4bit": ({"nbits": 4}, 1_000_000, 540_000, 30.5, (0, 0, 255)),
    "v-s50-4bit": ({"nbits": 4, "sparsity": 0.5}, 900_000, 440_000, 14.3, (255, 128, 0)),
    "v-linear8": ({"linear8": True}, 1_300_000, 990_000, 41.0, (0, 255, 255)),  # larger and worse than 6-bit
}


def fake_build(root: Path, name: str, compression, bundle, unet, psnr, colour, floor=12.0) -> Path:
    from PIL import Image

    folder = root / "builds" / name
    (folder / "samples").mkdir(parents=True)
    comp = None if compression is None else {**compression, "components": ["unet"]}
    build = {
        "name": name,
        "recipe": {"compression": comp, "verify": {"psnr_min_db": floor, "samples": 1, "seed": 93}},
        "bundle_bytes": bundle,
        "components": {
            "text_encoder": {"compressed": False, "package_bytes": 161_767, "psnr": {"psnr_db": 69.9}},
            "unet": {"compressed": compression is not None, "package_bytes": unet, "psnr": {"psnr_db": psnr}},
        },
        "sample_image": {"path": "samples/sample-93.png", "prompt": "a photo of an astronaut", "seed": 93, "steps": 4},
    }
    (folder / "build.json").write_text(json.dumps(build))
    Image.new("RGB", (64, 64), colour).save(folder / "samples" / "sample-93.png")
    return folder


@pytest.fixture
def builds(tmp_path) -> list[Path]:
    return [fake_build(tmp_path, name, *figures) for name, figures in VARIANTS.items()]


def test_pareto_front_keeps_only_unbeaten_points():
    points = [(2.4, 60.0), (1.2, 44.0), (1.0, 30.0), (0.9, 14.0), (1.3, 41.0), (1.2, 40.0)]
    assert pareto_front(points) == [3, 2, 1, 0]  # ordered by size; 4 and 5 are beaten by 1
    assert pareto_front([(1.0, 10.0), (1.0, 10.0)]) == [0, 1]  # equal points beat neither
    assert pareto_front([(1.0, 10.0)]) == [0]


def test_compare_page_in_headless_chromium(builds, chromium, tmp_path):  # noqa: F811
    from PIL import Image

    page = write_compare(builds, tmp_path / "out" / "compare.html")
    text = page.read_text()
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text  # self-contained
    url = page.resolve().as_uri()
    dom = run_chromium(chromium, tmp_path, "--dump-dom", url).stdout
    tables = _Tables()
    tables.feed(dom)
    rows = {r[0]: r[1:] for r in tables.tables["variants"]}
    assert rows["variant"] == list(VARIANTS)
    assert rows["bundle bytes"] == [str(v[1]) for v in VARIANTS.values()]
    assert rows["unet bytes"] == [str(v[2]) for v in VARIANTS.values()]
    assert rows["text_encoder bytes"] == ["161767"] * len(VARIANTS)
    assert rows["unet PSNR (dB)"] == [f"{v[3]:.1f}" for v in VARIANTS.values()]
    assert rows["compression"] == [
        "none (float16)", "6-bit palettization", "4-bit palettization", "50% sparse + 4-bit palettization", "linear 8-bit",
    ]
    assert rows["verify"][0].startswith("passed") and rows["verify"][3].startswith("passed")
    assert "Every sample: prompt “a photo of an astronaut”, seed 93, 4 steps." in dom
    # The chart: one circle per variant, the Pareto front ringed; linear 8-bit is beaten by 6-bit.
    import re

    circles = re.findall(r'<circle class="(variant(?: pareto)?)" data-name="([^"]+)"', dom)
    assert {name for cls, name in circles if cls == "variant pareto"} == {"v-fp16", "v-6bit", "v-4bit", "v-s50-4bit"}
    assert [name for _, name in circles] == list(VARIANTS)
    assert "v-linear8" not in dom.split('id="front"')[1].split("</p>")[0]

    shot = tmp_path / "compare.png"
    run_chromium(chromium, tmp_path, "--window-size=1400,1400", f"--screenshot={shot}", url)
    colours = {c for _n, c in Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)}
    for name, figures in VARIANTS.items():
        assert figures[4] in colours, f"the sample image of {name} did not render"
    assert (0xD6, 0x33, 0x84) in colours, "the Pareto front did not render"


def test_a_variant_below_its_floor_is_marked(tmp_path):
    folders = [fake_build(tmp_path, "a", None, 2, 1, 50.0, (1, 2, 3)), fake_build(tmp_path, "b", {"nbits": 2}, 1, 1, 9.0, (1, 2, 3), floor=20.0)]
    text = write_compare(folders, tmp_path / "c.html").read_text()
    assert 'class="fail">below floor: unet 9.0 dB &lt; 20 dB</td>' in text


def test_compare_cli_errors_are_one_line(tmp_path, builds):
    done = run_cli("compare", builds[0], tmp_path / "nothing-here", "-o", tmp_path / "c.html")
    assert_one_line_error(done, "no build.json here")
    assert not (tmp_path / "c.html").exists()
    done = run_cli("compare", builds[0], builds[0], "-o", tmp_path / "c.html")
    assert_one_line_error(done, "a build is named twice: v-fp16")


JOINT_MATRIX = """
name: jm
model: {version: synthetic:tiny-sd}
components: [unet]
resolution: {height: 64, width: 64}
target: macOS15
compression: {nbits: 4, components: [unet]}
verify: {samples: 1, psnr_min_db: 5}  # 50% pruning of random weights scores about 14 dB
matrix:
  compression.sparsity: [null, 0.5]
"""


def test_matrix_of_joint_variants_builds_verifies_and_writes_the_comparison(warm_artifacts, tmp_path):
    recipe = write_recipe(tmp_path, "jm", JOINT_MATRIX)
    done = run_cli_here("run", recipe, "--artifacts", warm_artifacts, "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    reports = {r["name"]: r for r in json.loads(done.stdout)}
    assert set(reports) == {"jm-sparsity-None", "jm-sparsity-0.5"}
    page = warm_artifacts / "compare" / "jm.html"
    assert {r["comparison"] for r in reports.values()} == {str(page)}
    unet = {name: r["components"]["unet"] for name, r in reports.items()}
    # Joint sparse + palettized is smaller than 4-bit alone, and verify ran the reference executor on it.
    assert unet["jm-sparsity-0.5"]["package_bytes"] < unet["jm-sparsity-None"]["package_bytes"]
    assert all(5 <= u["psnr"]["psnr_db"] < 100 for u in unet.values())
    assert unet["jm-sparsity-0.5"]["psnr"]["psnr_db"] < unet["jm-sparsity-None"]["psnr"]["psnr_db"]
    tables = _Tables()
    tables.feed(page.read_text())
    rows = {r[0]: r[1:] for r in tables.tables["variants"]}
    assert rows["variant"] == ["jm-sparsity-None", "jm-sparsity-0.5"]
    assert rows["unet bytes"] == [str(unet[n]["package_bytes"]) for n in rows["variant"]]
    assert rows["compression"] == ["4-bit palettization", "50% sparse + 4-bit palettization"]
