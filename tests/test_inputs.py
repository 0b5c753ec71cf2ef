"""Bad input never meets a traceback: hostile recipes, bad arguments, plan's errors are run's.

Exit status for every command (README): 2 for the user's input, 1 for a build or runtime
failure. Most cases run the CLI in-process (``main``), which is what a child process would run;
a few run it as a user would, to pin the real thing.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import REPO, run_cli, write_recipe
from sdbuild.cli import main
from sdbuild.errors import SdbuildError
from sdbuild.recipe import check_variants, load_recipe

TINY = "model:\n  version: synthetic:tiny-sd\nresolution: {height: 64, width: 64}\n"
FIGURES = {"tried": 0, "one_line": 0, "tracebacks": 0}


def one_line(capsys, code: int, argv: list, *fragments: str) -> str:
    """Run ``sdbuild argv`` in-process: exit ``code``, one ``error:`` line on stderr holding every fragment."""
    FIGURES["tried"] += 1
    try:
        got = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        got = e.code
    except BaseException:
        FIGURES["tracebacks"] += 1
        raise
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert got == code, (got, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    FIGURES["one_line"] += 1
    return lines[0]


# --- hostile recipes -------------------------------------------------------------------

ALIAS_BOMB = "\n".join(
    [f"a0: &a0 [{', '.join(['lol'] * 9)}]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
) + "\n"

BAD_RECIPES = {
    # name: (bytes of the file, fragments of the error line)
    "alias-bomb": (ALIAS_BOMB.encode(), [":1:", "expands to more than"]),
    "many-aliases": (("x: &x 1\ny: [" + ", ".join(["*x"] * 500) + "]\n").encode(), [":2:", "aliases"]),
    "self-alias": (b"a: &a [*a]\n", [":1:", "contains it"]),
    "deep": (("a: " + "[" * 5000 + "]" * 5000 + "\n").encode(), [":1:", "nested more than"]),
    "deep-blocks": ("".join(f"{'  ' * i}k{i}:\n" for i in range(60)).encode(), ["nested more than"]),
    "binary": (bytes(range(256)) * 8, [":1:", "binary"]),
    "latin-1": ("name: café\n".encode("latin-1"), [":1:", "not UTF-8"]),
    "utf-16": ("name: x\n".encode("utf-16"), ["binary"]),
    "duplicate-key": ((TINY + "attention: ORIGINAL\nattention: SPLIT_EINSUM\n").encode(), [":5:", "attention: duplicate key (first at line 4)"]),
    "duplicate-nested-key": ((TINY + "verify:\n  seed: 1\n  seed: 2\n").encode(), [":6:", "seed: duplicate key"]),
    "too-big": (b"# " + b"x" * (1 << 20) + b"\n", [":1:", "the limit is 1 MiB"]),
    "list-key": (b"? [a, b]\n: 1\n", [":1:"]),
    "not-a-mapping": (b"- 1\n- 2\n", [":1:", "a recipe is a mapping"]),
    "bad-tag": (b"name: !!python/object:os.system x\n", [":1:", "not valid YAML"]),
    "tab-indent": (b"model:\n\tversion: x\n", [":2:", "not valid YAML"]),
}


@pytest.mark.parametrize("name", list(BAD_RECIPES))
def test_hostile_recipe_is_one_line_with_file_and_line_exit_2(tmp_path, capsys, name):
    content, fragments = BAD_RECIPES[name]
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(content)
    for command in ("plan", "run"):
        one_line(capsys, 2, [command, path, "--artifacts", tmp_path / "art"], str(path), *fragments)
    assert not (tmp_path / "art" / "cache").exists()


def test_a_device_or_folder_is_not_a_recipe(tmp_path, capsys):
    one_line(capsys, 2, ["plan", "/dev/zero"], "/dev/zero:1:", "limit is 1 MiB")
    one_line(capsys, 2, ["plan", tmp_path], "is a folder")


def test_alias_bomb_fails_fast_in_little_memory(tmp_path):
    import resource
    import time

    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(SdbuildError):
        load_recipe(path)
    assert time.perf_counter() - started < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024  # KiB: under 50 MiB more


def test_plan_reports_exactly_the_errors_run_would(tmp_path, capsys):
    matrix = write_recipe(tmp_path, "mx", TINY + "matrix:\n  compression.nbits: [5, 7]\n")
    missing = write_recipe(tmp_path, "missing", "model:\n  version: ./no/such/folder\n")
    not_diffusers = write_recipe(tmp_path, "plain", f"model:\n  version: {tmp_path}\n")
    for recipe, fragments in (
        (matrix, [f"{matrix}:5:", "compression.nbits", "(got 5)"]),
        (missing, [f"{missing}:2:", "model.version: folder not found"]),
        (not_diffusers, [f"{not_diffusers}:2:", "not a diffusers folder"]),
    ):
        lines = [one_line(capsys, 2, [command, recipe, "--artifacts", tmp_path / "art"], *fragments) for command in ("plan", "run")]
        assert lines[0] == lines[1]
    assert not (tmp_path / "art" / "cache").exists()


def test_a_missing_model_folder_as_a_user_sees_it(tmp_path):
    recipe = write_recipe(tmp_path, "missing", "model:\n  version: ./models/my-sd15\n")
    done = run_cli("run", recipe, "--artifacts", tmp_path / "art")
    assert done.returncode == 2 and done.stderr.startswith(f"error: {recipe}:2: model.version: folder not found"), done.stderr


# --- the command line ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    """A bundle folder shaped like a real one (packages are only looked at, never loaded, by these checks)."""
    folder = tmp_path_factory.mktemp("bundle") / "Resources"
    for name in ("TextEncoder", "Unet", "VAEDecoder"):
        (folder / f"{name}.mlpackage").mkdir(parents=True)
    return folder


GENERATE_CASES = {
    "negative seed": (["--seed", "-5"], "--seed -5"),
    "seed above 2**32": (["--seed", str(2**32)], "--seed 4294967296"),
    "nan guidance": (["--guidance-scale", "nan"], "--guidance-scale nan"),
    "inf guidance": (["--guidance-scale", "inf"], "--guidance-scale inf"),
    "huge guidance": (["--guidance-scale", "1e308"], "--guidance-scale 1e+308"),
    "zero guidance": (["--guidance-scale", "0"], "--guidance-scale 0"),
    "negative guidance": (["--guidance-scale", "-1"], "--guidance-scale -1"),
    "zero steps": (["--steps", "0"], "--steps 0"),
    "too many steps": (["--steps", "100000"], "--steps 100000"),
    "zero images": (["--image-count", "0"], "--image-count 0"),
    "strength above one": (["--strength", "1.5"], "--strength 1.5"),
    "nan strength": (["--strength", "nan"], "--strength nan"),
    "nan controlnet scale": (["--controlnet-scale", "nan"], "--controlnet-scale nan"),
    "seed not a number": (["--seed", "abc"], "--seed"),
    "unknown scheduler": (["--scheduler", "Heun"], "Heun"),
    "unknown option": (["--sead", "1"], "--sead"),
    "missing image": (["--image", "/no/such.png"], "/no/such.png"),
}


@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_generate_arguments_are_checked_before_any_model_loads(tiny_bundle, tmp_path, capsys, monkeypatch, case):
    from sdbuild import generate

    monkeypatch.setattr(generate.Pipeline, "from_bundle", lambda *a, **k: pytest.fail("a model loaded"))
    args, fragment = GENERATE_CASES[case]
    one_line(capsys, 2, ["generate", "--bundle", tiny_bundle, "--prompt", "x", "-o", tmp_path, *args], fragment)


def test_generate_output_naming_a_file_and_a_missing_bundle(tiny_bundle, tmp_path, capsys):
    existing = tmp_path / "image.png"
    existing.write_bytes(b"not a folder")
    one_line(capsys, 2, ["generate", "--bundle", tiny_bundle, "--prompt", "x", "-o", existing], f"-o {existing}", "is a file")
    one_line(capsys, 2, ["generate", "--bundle", tiny_bundle, "--prompt", "x", "-o", existing / "sub"], "is a file")
    one_line(capsys, 2, ["generate", "--bundle", tmp_path / "nope", "--prompt", "x"], "--bundle", "no such folder")


def test_exec_arguments_are_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import numpy as np

    from sdbuild.mil import executor

    monkeypatch.setattr(executor, "load_program", lambda *a, **k: pytest.fail("the model loaded"))
    package = tmp_path / "M.mlpackage"
    package.mkdir()
    inputs = tmp_path / "in.npz"
    np.savez(inputs, x=np.zeros(1, np.float32))
    one_line(capsys, 2, ["exec", tmp_path / "Nope.mlpackage", "--inputs", inputs, "--output", tmp_path / "o.npz"], "no such package")
    one_line(capsys, 2, ["exec", package, "--inputs", tmp_path / "none.npz", "--output", tmp_path / "o.npz"], "--inputs")
    one_line(capsys, 2, ["exec", package, "--inputs", inputs, "--output", tmp_path], "--output", "is a folder")
    one_line(capsys, 2, ["exec", package, "--inputs", inputs, "--output", inputs / "o.npz"], "is a file")
    one_line(capsys, 2, ["exec", package, "--inputs", inputs, "--output", inputs], "is the inputs file")
    one_line(capsys, 2, ["exec", package, "--inputs", inputs, "--output", tmp_path / "o.npz", "--precision", "fp8"], "--precision")


def test_inspect_of_a_bundle_missing_its_unet_weights_is_one_line(tmp_path, capsys):
    unet = tmp_path / "Resources" / "Unet.mlpackage"
    _save_small_program(unet)
    assert main(["inspect", str(tmp_path / "Resources"), "--json"]) == 0
    capsys.readouterr()
    (unet / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").unlink()
    one_line(capsys, 1, ["inspect", tmp_path / "Resources"], "Unet.mlpackage", "weight.bin is missing")
    one_line(capsys, 1, ["inspect", unet], "weight.bin is missing")
    one_line(capsys, 2, ["inspect", tmp_path / "nothing-here"], "no such file or folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line(capsys, 2, ["inspect", empty], "not a bundle")


def _save_small_program(path: Path) -> None:
    """A small ML program package with its weights in a weight file, standing in for a bundle's Unet."""
    import coremltools as ct
    import numpy as np
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 64))], opset_version=ct.target.iOS16)
    def prog(x):
        return mb.linear(x=x, weight=np.ones((64, 64), np.float32))

    ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16).save(str(path))


# --- one exit-code convention ----------------------------------------------------------


def test_exit_codes_follow_one_convention(tmp_path, capsys):
    bad = write_recipe(tmp_path, "bad", TINY + "attention: FAST\n")
    one_line(capsys, 2, ["run", bad, "--artifacts", tmp_path / "a"], "attention")
    one_line(capsys, 2, ["plan", bad], "attention")
    one_line(capsys, 2, ["matrix", bad], "attention")
    one_line(capsys, 2, ["run", tmp_path / "none.yaml"], "recipe file not found")
    one_line(capsys, 2, ["run", write_recipe(tmp_path, "ok", TINY), "--force", "nope", "--artifacts", tmp_path / "a"], "--force")
    one_line(capsys, 2, ["cache", "shrink"], "invalid choice")
    one_line(capsys, 2, ["frobnicate"], "invalid choice")
    (tmp_path / "a" / "cache" / "convert" / "abc").mkdir(parents=True)  # a half entry: verify finds it, exit 1
    assert main(["cache", "verify", "--artifacts", str(tmp_path / "a")]) == 1
    assert "manifest.json is missing" in capsys.readouterr().out


# --- fuzzing ---------------------------------------------------------------------------

SEEDS = [p.read_text() for p in sorted((REPO / "recipes").glob("*.yaml"))] + [TINY]
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(["synthetic:tiny-sd", "ORIGINAL", "swift", "../x.yaml", "a/b", "~", ""]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.sampled_from(["nbits", "unet", "model", "version"]), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def mutated_recipes(draw) -> bytes:
    text = draw(st.sampled_from(SEEDS))
    kind = draw(st.sampled_from(["value", "bytes", "lines"]))
    if kind == "value":
        data = yaml.safe_load(text) or {}
        node, path = data, []
        while isinstance(node, dict) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node, key=str)))
            path.append(key)
            node = node[key]
        target = data
        for key in path[:-1]:
            target = target[key]
        key = path[-1] if path else draw(st.sampled_from(["name", "model", "matrix", "extends", "compression", "resolution", "chunk"]))
        target[key] = draw(VALUES)
        return yaml.safe_dump(data, allow_unicode=True).encode()
    raw = bytearray(text.encode())
    if kind == "bytes":
        for _ in range(draw(st.integers(1, 6))):
            at = draw(st.integers(0, len(raw)))
            raw[at:at + draw(st.integers(0, 3))] = draw(st.binary(max_size=4))
        return bytes(raw)
    lines = text.splitlines(keepends=True)
    ops = draw(st.lists(st.tuples(st.sampled_from(["dup", "drop", "swap", "indent"]), st.integers(0, 50)), min_size=1, max_size=4))
    for op, i in ops:
        if not lines:
            break
        i %= len(lines)
        if op == "dup":
            lines.insert(i, lines[i])
        elif op == "drop":
            del lines[i]
        elif op == "swap":
            lines[i], lines[-1] = lines[-1], lines[i]
        else:
            lines[i] = "  " + lines[i]
    return "".join(lines).encode()


FUZZ = {"tried": 0, "refused": 0}


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(content=mutated_recipes())
def test_fuzzed_recipes_never_raise_a_traceback_nor_make_a_cache_entry(tmp_path_factory, content):
    from sdbuild.executor import plan_rows, prepare

    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "r.yaml"
    path.write_bytes(content)
    FUZZ["tried"] += 1
    try:
        check_variants(path)
        build = prepare(path, folder / "art", strict=False)
        assert all(r.status in ("to build", "needs network", "skipped", "pending") for r in plan_rows(build))
    except SdbuildError as e:
        FUZZ["refused"] += 1
        assert "\n" not in str(e) and str(e)
    assert not (folder / "art" / "cache").exists()


def test_figures(capsys):
    with capsys.disabled():
        print(f"\nbad inputs: {FIGURES}; fuzzed recipes: {FUZZ}")
    assert FIGURES["tracebacks"] == 0
