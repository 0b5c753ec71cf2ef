"""Two clean builds of one recipe are the same bytes: every bundle file, and every package-making cache entry.

The recipe is the tiny model with what rewrites packages on the way: a
6-bit unet (compress), in two chunks (chunk), both layouts (bundle). The
second build starts from an empty artifacts folder. The first starts from the
cache entries of the run's cold tiny build (conftest's ``tiny_cold_build``,
itself built from an empty folder by another process, at another path, with
stages side by side): the tiny recipe's download, traces, converts and 6-bit
unet are the same keys, so each of those entries is still made twice, by two
clean builds, and compared; the chunks and bundles are made by both builds here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builds import copy_cache_entries
from helpers import write_recipe
from sdbuild.cache import hash_tree

RECIPE = """
name: repro
model: {version: 'synthetic:tiny-sd'}
resolution: {height: 64, width: 64}
compression: {nbits: 6, components: [unet]}
chunk: {unet: 2}
bundle: {layout: both}
verify: {samples: 1}
"""
# What records the run itself (times, cache hits, the log), not the bundle.
RUN_RECORDS = {"build.json", "build.log", "report.html", "report.md"}
PACKAGE_STAGES = ("convert", "compress", "chunk")


@pytest.fixture(scope="module")
def builds(tmp_path_factory, tiny_cold_build) -> list[Path]:
    from sdbuild.executor import prepare, run_build

    out = []
    for i in range(2):
        artifacts = tmp_path_factory.mktemp(f"clean{i}")
        if i == 0:
            copy_cache_entries(tiny_cold_build, artifacts)
        recipe = write_recipe(artifacts, "repro", RECIPE)
        out.append(run_build(prepare(recipe, artifacts)).build_dir)
    return out


def bundle_files(build_dir: Path) -> dict[str, str]:
    return {rel: sha for rel, sha in hash_tree(build_dir).items() if rel not in RUN_RECORDS}


def test_two_clean_builds_give_the_same_bundle_bytes(builds):
    first, second = (bundle_files(b) for b in builds)
    assert any(rel.startswith("Resources/UnetChunk2.mlpackage/") for rel in first)
    assert any(rel.startswith("python/") and rel.endswith("Manifest.json") for rel in first)
    assert first.keys() == second.keys()
    differing = sorted(rel for rel in first if first[rel] != second[rel])
    assert differing == []


def test_two_clean_builds_give_the_same_cache_entries(builds):
    """convert, compress and chunk entries: same keys, same file hashes (no date, no random identifier)."""
    entries = []
    for build_dir in builds:
        cache = build_dir.parent.parent / "cache"
        entries.append(
            {
                (stage, manifest.parent.name): json.loads(manifest.read_text())["files"]
                for stage in PACKAGE_STAGES
                for manifest in (cache / stage).glob("*/manifest.json")
            }
        )
    assert len(entries[0]) >= 4 and entries[0] == entries[1]


def test_packages_hold_no_date_and_no_random_identifier(builds):
    from sdbuild.mlpackage import CONVERSION_DATE, load_spec, write_manifest

    for package in sorted(builds[0].glob("**/*.mlpackage")):
        assert CONVERSION_DATE not in load_spec(package).description.metadata.userDefined, package
        before = (package / "Manifest.json").read_bytes()
        write_manifest(package)  # derived from content: writing it again changes nothing
        assert (package / "Manifest.json").read_bytes() == before, package
