"""End to end: the tiny recipe built by the command line, as `make demo` does."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, run_cli, run_cli_here, run_cli_watching_imports, write_recipe

TINY = REPO / "recipes" / "tiny.yaml"

# CONTRACT.md, for the tiny SD model: C = 32 (text width), latent 8×8 for a 64×64 image.
CONTRACT = {
    "TextEncoder": ({"input_ids": [1, 77]}, {"last_hidden_state": [1, 77, 32], "pooled_outputs": [1, 32]}),
    "Unet": (
        {"sample": [2, 4, 8, 8], "timestep": [2], "encoder_hidden_states": [2, 32, 1, 77]},
        {"noise_pred": [2, 4, 8, 8]},
    ),
    "VAEDecoder": ({"z": [1, 4, 8, 8]}, {"image": [1, 3, 64, 64]}),
}


@pytest.fixture(scope="module")
def artifacts(tiny_cold_build, tmp_path_factory) -> Path:
    """The tiny recipe built cold by the command line (conftest's ``tiny_cold_build``, made once per
    run), copied: its build.json is the cold run's, and the tests below build more into the copy."""
    art = tmp_path_factory.mktemp("artifacts") / "artifacts"
    shutil.copytree(tiny_cold_build, art, symlinks=True)  # a link into the cache would stay one (and fail below)
    return art


def test_the_build_process_imports_nothing_heavy_when_stages_run(tiny_cold_build):
    # Stages, and the bundle's package specs, are written in processes forked from the stage server.
    assert json.loads((tiny_cold_build.parent / "heavy_imports.json").read_text()) == []


def build_json(art: Path, name: str) -> dict:
    return json.loads((art / "builds" / name / "build.json").read_text())


def statuses(report: dict) -> dict[tuple[str, str | None], str]:
    return {(r["stage"], r["component"]): r["cache"] for r in report["stages"]}


def io_of(package: Path):
    import coremltools as ct

    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    types = ct.proto.FeatureTypes_pb2.ArrayFeatureType
    # As Apple's converter declares them (docs/interface.md): token ids, values between chunks and
    # every output float32; the SD unet's and VAE's inputs float16 (tests/test_interface.py has each rule).
    for feature in spec.description.input:
        want = types.FLOAT32 if feature.name == "input_ids" or feature.name.endswith("_fp32") else types.FLOAT16
        assert feature.type.multiArrayType.dataType == want, (package.name, feature.name)
    for feature in spec.description.output:
        assert feature.type.multiArrayType.dataType == types.FLOAT32, (package.name, feature.name)
    ins = {i.name: list(i.type.multiArrayType.shape) for i in spec.description.input}
    outs = {o.name: list(o.type.multiArrayType.shape) for o in spec.description.output}
    return ins, outs


def test_demo_bundle_has_contract_files_names_and_shapes(artifacts):
    resources = artifacts / "builds" / "tiny" / "Resources"
    assert sorted(p.name for p in resources.iterdir()) == sorted(
        [f"{n}.mlpackage" for n in CONTRACT] + ["vocab.json", "merges.txt"]
    )
    for name, (inputs, outputs) in CONTRACT.items():
        assert io_of(resources / f"{name}.mlpackage") == (inputs, outputs), name
    vocab = json.loads((resources / "vocab.json").read_text())
    assert vocab["<|endoftext|>"] == len(vocab) - 1
    assert (resources / "merges.txt").read_text().startswith("#version: 0.2\n")


def test_report_and_sample_image(artifacts):
    from PIL import Image

    build = artifacts / "builds" / "tiny"
    report = build_json(artifacts, "tiny")
    assert report["sample_image"]["path"] == "sample.png" and report["sample_image"]["steps"] > 0
    image = Image.open(build / "sample.png")
    assert image.size == (64, 64) and image.text["prompt"] == report["sample_image"]["prompt"]
    html = (build / "report.html").read_text()
    assert "data:image/png;base64," in html and "PSNR" in html
    assert (build / "report.md").read_text().count("|") > 20


def test_bundle_files_are_not_symlinks_into_the_cache(artifacts):
    for p in (artifacts / "builds" / "tiny").rglob("*"):
        assert not p.is_symlink(), p


def test_build_json_reports_every_stage(artifacts):
    report = build_json(artifacts, "tiny")
    assert report["recipe"]["compression"]["nbits"] == 6
    rows = {(r["stage"], r["component"]): r for r in report["stages"]}
    assert set(rows) == {
        ("download", None),
        *((s, c) for s in ("trace", "convert", "verify") for c in ("text_encoder", "unet", "vae_decoder")),
        ("compress", "unet"),
        ("sample", None),
    }
    for row in rows.values():
        assert len(row["key"]) == 24 and row["build_seconds"] > 0
    built = [r for r in rows.values() if r["cache"] == "miss"]
    assert built and all(r["peak_rss_bytes"] > 50 * 2**20 for r in built)
    unet = report["components"]["unet"]
    assert unet["compressed"] and unet["package_bytes"] < unet["float16_bytes"]
    assert "compile skipped" in " ".join(report["notes"])
    assert (artifacts / "builds" / "tiny" / "build.log").stat().st_size > 0


def test_independent_stages_were_built_side_by_side(artifacts):
    # The fixture's cold build ran with the default --jobs (the cores); a one-core machine builds one at a time.
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: stages run one at a time")
    built = [r for r in build_json(artifacts, "tiny")["stages"] if r["cache"] == "miss" and r["stage"] != "sample"]
    windows = [(r["ran_s"], r["stage"], r["component"]) for r in built]
    overlapping = [(a[1:], b[1:]) for i, a in enumerate(windows) for b in windows[i + 1 :] if a[0][0] < b[0][1] and b[0][0] < a[0][1]]
    assert overlapping, windows


def test_second_run_hits_cache_for_every_stage(artifacts):
    before = build_json(artifacts, "tiny")["bundle"]
    done, heavy = run_cli_watching_imports("run", TINY, "--artifacts", artifacts)
    assert done.returncode == 0, done.stderr[-2000:]
    # Every stage a hit, so no stage process ran and nothing heavy was imported.
    assert set(statuses(build_json(artifacts, "tiny")).values()) == {"hit"}
    assert heavy == []
    # The bundle was taken over from the previous build, not rewritten, and is still whole.
    after = build_json(artifacts, "tiny")["bundle"]
    contents = lambda bundle: (bundle["key"], {rel: record[-1] for rel, record in bundle["files"].items()})  # sha256 last
    assert contents(after) == contents(before) and len(after["files"]) == len(before["files"])
    for name, (inputs, outputs) in CONTRACT.items():
        assert io_of(artifacts / "builds" / "tiny" / "Resources" / f"{name}.mlpackage") == (inputs, outputs), name
    plan, heavy = run_cli_watching_imports("plan", TINY, "--artifacts", artifacts, "--json")
    assert heavy == []
    rows = json.loads(plan.stdout)
    keyed = [r for r in rows if r["key"]]
    assert keyed and all(r["status"] == "cached" for r in keyed)


def same_stage_output(a: Path, b: Path) -> list[str]:
    """Files of two cache entries that differ in content, beyond what differs between any two runs.

    Random per save: a TorchScript archive's serialization id and debug tables,
    an mlpackage's item ids, and protobuf's map order in a spec (compared parsed).
    """
    import zipfile

    import coremltools as ct

    files = lambda entry: {p.relative_to(entry).as_posix() for p in entry.rglob("*") if p.is_file() and p.name != "manifest.json"}
    names = files(a) | files(b)
    differ = sorted(names ^ (files(a) & files(b)))
    for name in sorted(files(a) & files(b)):
        x, y = a / name, b / name
        if name.endswith("Manifest.json"):
            same = sorted(json.loads(x.read_text())["itemInfoEntries"].values(), key=str) == sorted(
                json.loads(y.read_text())["itemInfoEntries"].values(), key=str
            )
        elif name.endswith("model.mlmodel"):
            same = ct.utils.load_spec(str(x.parents[2])) == ct.utils.load_spec(str(y.parents[2]))
        elif name.endswith(".pt"):
            members = lambda z: {n: z.read(n) for n in z.namelist() if not n.endswith((".debug_pkl", "serialization_id"))}
            with zipfile.ZipFile(x) as zx, zipfile.ZipFile(y) as zy:
                same = members(zx) == members(zy)
        else:
            same = x.read_bytes() == y.read_bytes()
        if not same:
            differ.append(name)
    return differ


def test_one_stage_at_a_time_gives_the_same_outputs_as_side_by_side(artifacts, tmp_path):
    from sdbuild.executor import prepare

    sequential = tmp_path / "sequential"
    nodes = [n for n in prepare(TINY, artifacts).nodes if n.stage.name in ("download", "trace", "convert")]
    assert len(nodes) == 7
    # The download runs alone in either mode (every other stage needs it): its entry is copied, the
    # three trace and three convert stages, side by side in the cold build, are built one at a time here.
    download = next(n for n in nodes if n.stage.name == "download")
    shutil.copytree(artifacts / "cache" / "download" / download.key, sequential / "cache" / "download" / download.key)
    done = run_cli_here("run", TINY, "--artifacts", sequential, "--jobs", "1", "--until", "convert")
    assert done.returncode == 0, done.stderr[-2000:]
    for node in nodes:
        one, side_by_side = (root / "cache" / node.stage.name / node.key for root in (sequential, artifacts))
        assert same_stage_output(one, side_by_side) == [], node.label


def test_nbits_change_reuses_download_trace_convert(artifacts, tmp_path):
    # A 4-bit random-weight unet scores about 27 dB: lower the gate (it is not part of any key).
    recipe = write_recipe(
        tmp_path, "tiny-4bit", f"extends: {TINY}\nname: tiny-4bit\ncompression:\n  nbits: 4\nverify: {{psnr_min_db: 20}}\n"
    )
    done = run_cli_here("run", recipe, "--artifacts", artifacts)
    assert done.returncode == 0, done.stderr[-2000:]
    got = statuses(build_json(artifacts, "tiny-4bit"))
    # What depends on the 4-bit unet is new; everything before compress comes from the cache.
    assert [got.pop(k) for k in (("compress", "unet"), ("verify", "unet"), ("sample", None))] == ["miss"] * 3
    assert set(got.values()) == {"hit"}
    first = {(r["stage"], r["component"]): r["key"] for r in build_json(artifacts, "tiny")["stages"]}
    second = {(r["stage"], r["component"]): r["key"] for r in build_json(artifacts, "tiny-4bit")["stages"]}
    assert first[("convert", "unet")] == second[("convert", "unet")]
    assert first[("compress", "unet")] != second[("compress", "unet")]


def test_sigkill_during_convert_leaves_no_entry_and_next_run_succeeds(artifacts, tmp_path):
    from sdbuild.executor import prepare

    # Another target: trace is cached, every convert is new.
    recipe = write_recipe(tmp_path, "tiny-13", f"extends: {TINY}\nname: tiny-13\ntarget: macOS13\n")
    keys = {n.component: n.key for n in prepare(recipe, artifacts).nodes if n.stage.name == "convert"}
    cache = artifacts / "cache"
    # Up to the converts: what follows them (compress, verify, sample, bundle) is not what this checks.
    until = ("--until", "convert")
    proc = subprocess.Popen(  # three converts side by side
        [sys.executable, "-m", "sdbuild.cli", "run", str(recipe), "--artifacts", str(artifacts), "--jobs", "3", *until],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.time() + 300
    while not list((cache / ".tmp").glob("convert-*")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before any convert started"
        time.sleep(0.05)
    time.sleep(1.0)  # well inside the conversion
    victim = next((cache / ".tmp").glob("convert-*")).name.split("-")[1]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cache / "convert" / victim).exists()
    assert victim in keys.values()
    done = run_cli_here("run", recipe, "--artifacts", artifacts, *until)
    assert done.returncode == 0, done.stderr[-2000:]
    for key in keys.values():
        assert (cache / "convert" / key / "manifest.json").is_file()


def test_hub_id_without_network_is_one_clear_line(tmp_path):
    recipe = write_recipe(tmp_path, "hub", "model: {version: someone/not-cached-model}\n")
    env_home = tmp_path / "hf"
    done = subprocess.run(
        [sys.executable, "-m", "sdbuild.cli", "run", str(recipe), "--artifacts", str(tmp_path / "art")],
        capture_output=True, text=True, env={**os.environ, "HF_HOME": str(env_home), "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "error: model.version: cannot reach the Hugging Face Hub for 'someone/not-cached-model' and it is not in the "
        "local cache; download it where there is network, or set model.version to a local diffusers folder"
    )


def test_a_checkpoint_folder_without_its_tokenizer_stops_before_any_stage(tiny_sd_checkpoint, tmp_path):
    """The bundle ships the checkpoint's tokenizer: a folder without one is one line before any work, not a
    FileNotFoundError at the bundle stage after the conversions."""
    from helpers import assert_one_line_error

    checkpoint = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_sd_checkpoint, checkpoint)
    shutil.rmtree(checkpoint / "tokenizer")
    (checkpoint / "tokenizer_2").mkdir()
    (checkpoint / "tokenizer_2" / "vocab.json").write_text("{}")  # half a tokenizer is none
    recipe = write_recipe(tmp_path, "untokenized", f"model: {{version: {checkpoint}}}\n")
    artifacts = tmp_path / "art"
    done = run_cli_here("run", recipe, "--artifacts", artifacts)
    assert_one_line_error(done, "model.version", str(checkpoint), "tokenizer/", "vocab.json and merges.txt")
    assert not [p for p in (artifacts / "cache").glob("*/*/manifest.json")]  # nothing was built
    # A run that ships no bundle does not need it.
    done = run_cli_here("run", recipe, "--artifacts", artifacts, "--until", "download")
    assert done.returncode == 0, done.stderr[-2000:]


def test_verify_reports_psnr_per_component(artifacts):
    components = build_json(artifacts, "tiny")["components"]
    for name in ("text_encoder", "vae_decoder"):
        assert components[name]["psnr"]["psnr_db"] >= 45, (name, components[name]["psnr"])
    unet = components["unet"]["psnr"]
    # The shipped unet is 6-bit: its float16 parent is checked too, and the cost of compression alone.
    assert unet["float16_psnr_db"] >= 45
    assert 20 < unet["psnr_db"] < unet["float16_psnr_db"]
    assert unet["vs_float16_psnr_db"] > 20


def test_layout_both_writes_swift_and_python_trees(artifacts, tmp_path):
    recipe = write_recipe(tmp_path, "tiny-both", f"extends: {TINY}\nname: tiny-both\nbundle: {{layout: both}}\n")
    done = run_cli_here("run", recipe, "--artifacts", artifacts)
    assert done.returncode == 0, done.stderr[-2000:]
    build = artifacts / "builds" / "tiny-both"
    python = sorted(p.name for p in (build / "python").iterdir())
    prefix = "Stable_Diffusion_version_synthetic:tiny-sd_"
    assert python == sorted([f"{prefix}{c}.mlpackage" for c in ("text_encoder", "unet", "vae_decoder")] + ["merges.txt", "vocab.json"])
    assert sorted(p.name for p in (build / "Resources").iterdir()) == sorted(
        [f"{n}.mlpackage" for n in CONTRACT] + ["vocab.json", "merges.txt"]
    )
    assert io_of(build / "python" / f"{prefix}unet.mlpackage") == CONTRACT["Unet"]
    import coremltools as ct

    meta = ct.utils.load_spec(str(build / "Resources" / "Unet.mlpackage")).description.metadata
    assert meta.userDefined["com.sdbuild.recipe"] == "tiny-both"
    assert meta.userDefined["com.sdbuild.compression"] == "6-bit palettization"
    assert meta.userDefined["com.sdbuild.attention"] == "SPLIT_EINSUM"
    assert "model card" in meta.license
    facts = json.loads((build / "pipeline.json").read_text())
    assert facts["vae_scaling_factor"] == pytest.approx(0.18215) and facts["family"] == "sd"
    # Writing metadata into the bundle must not touch the cache entry it links to.
    assert run_cli("cache", "verify", "--artifacts", artifacts).returncode == 0


def test_layout_python_alone_has_no_swift_resources(artifacts, tmp_path):
    recipe = write_recipe(tmp_path, "tiny-py", f"extends: {TINY}\nname: tiny-py\nbundle: {{layout: python}}\n")
    done = run_cli_here("run", recipe, "--artifacts", artifacts)
    assert done.returncode == 0, done.stderr[-2000:]
    build = artifacts / "builds" / "tiny-py"
    assert not (build / "Resources").exists()
    prefix = "Stable_Diffusion_version_synthetic:tiny-sd_"
    assert sorted(p.name for p in (build / "python").iterdir()) == sorted(
        [f"{prefix}{c}.mlpackage" for c in ("text_encoder", "unet", "vae_decoder")] + ["merges.txt", "vocab.json"]
    )


def test_bundle_survives_cache_gc(artifacts, tmp_path):
    import shutil

    copy = tmp_path / "art"
    shutil.copytree(artifacts, copy)
    for report in (copy / "builds").glob("*/build.json"):
        report.unlink()  # nothing references the cache any more
    assert run_cli("cache", "gc", "--artifacts", copy).returncode == 0
    assert not any((copy / "cache" / "convert").iterdir())
    from sdbuild.mil.executor import load_program

    load_program(copy / "builds" / "tiny" / "Resources" / "Unet.mlpackage")
