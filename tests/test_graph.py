"""The stage graph and its keys, without building anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from graph_cases import CASES, structural_keys
from helpers import REPO, write_recipe

from sdbuild.executor import prepare

TINY = REPO / "recipes" / "tiny.yaml"
# Planned at 1083e68 and 432bbae (W8A8), before the graph was derived. The mixed-bit case's analyze
# node and what follows it re-recorded since: analyze keys the inputs it measures on (``analysis``),
# not the resolution (test_analyze_keys_its_own_inputs_not_the_resolution).
BASE = Path(__file__).parent / "data" / "graph_base.json"
COMPILER = "coremlcompiler 3400.1"
# The bundle follows every key of its build, the sample image every verify key.
WHOLE_BUILD = {("bundle", None), ("sample", None)}


def keys(build) -> dict:
    return {(n.stage.name, n.component): n.key for n in build.nodes}


def sample_node(build):
    return next(n for n in build.nodes if n.stage.name == "sample")


def graph_record(build) -> list[dict]:
    """Every node's stage, component, key and upstream, in plan order (as tests/data/graph_base.json holds them)."""
    return [
        {"stage": n.stage.name, "component": n.component, "key": n.key, "deps": [[d.stage.name, d.component] for d in n.deps]}
        for n in build.nodes
    ]


def planned(recipe, overrides, compiler, tmp_path, monkeypatch) -> list[dict]:
    import sdbuild.stages.compile as compile_stage

    monkeypatch.setattr(compile_stage, "compiler_available", lambda: compiler is not None)
    monkeypatch.setattr(compile_stage, "compiler_version", lambda: compiler)
    return graph_record(prepare(recipe, tmp_path, overrides))


def label(row: dict) -> tuple:
    return row["stage"], row["component"]


@pytest.mark.parametrize("platform", ["linux", "macos"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_the_declared_graph_is_the_hand_wired_one(case, platform, tmp_path, monkeypatch):
    """Same nodes, same upstream edges, same keys as the hand-wired graph (code digest and library
    versions held fixed: any edit to a stage's source moves its real key, as it must).

    The bundle's key moves: it is now made like every stage's, whose fields carry ``component``
    (null for the whole build). On macOS the compile nodes are planned before the verify nodes
    (build order: compile comes before bundle and verify for ``--until``), not after.
    """
    from sdbuild.cache import stage_key

    name, recipe, overrides = case
    base = json.loads(BASE.read_text())[f"{name}/{platform}"]
    with structural_keys():
        new = planned(recipe, overrides, COMPILER if platform == "macos" else None, tmp_path, monkeypatch)
        bundle = next(n for n in prepare(recipe, tmp_path, overrides).nodes if n.stage.name == "bundle")
    old = {label(r): r for r in base}
    now = {label(r): r for r in new}
    assert set(now) == set(old)
    for node, row in old.items():
        assert sorted(map(tuple, now[node]["deps"]), key=str) == sorted(map(tuple, row["deps"]), key=str), node
        if node != ("bundle", None):
            assert now[node]["key"] == row["key"], node
    # The bundle's key is the old one with its fields' `component: null` left out.
    fields = {k: v for k, v in bundle.record["fields"].items() if k != "component"}
    record = bundle.record
    assert stage_key("bundle", record["stage_version"], fields, record["upstream"], record["versions"]) == old[("bundle", None)]["key"]
    order = [label(r) for r in base]
    compiles = [n for n in order if n[0] == "compile"]
    rest = [n for n in order if n[0] != "compile"]
    at = next((i for i, n in enumerate(rest) if n[0] == "verify"), len(rest))
    assert [label(r) for r in new] == rest[:at] + compiles + rest[at:]


def test_keys_change_exactly_downstream_of_a_changed_field(tmp_path):
    six = prepare(TINY, tmp_path)
    eight = prepare(write_recipe(tmp_path, "t8", f"extends: {TINY}\nname: t8\ncompression: {{nbits: 8}}\n"), tmp_path)
    a, b = keys(six), keys(eight)
    changed = {k for k in a if a[k] != b[k]}
    assert changed == {("compress", "unet"), ("verify", "unet"), *WHOLE_BUILD}


def test_sample_key_follows_every_shipped_model(tmp_path):
    """The sample follows all verify nodes, not only one of them (they share a stage name)."""
    six = prepare(TINY, tmp_path)
    eight = prepare(write_recipe(tmp_path, "t8", f"extends: {TINY}\nname: t8\ncompression: {{nbits: 8}}\n"), tmp_path)
    # Only the unet differs, and its verify is not the last verify node in the graph.
    assert [n.component for n in six.nodes if n.stage.name == "verify"][-1] != "unet"
    assert sample_node(six).key != sample_node(eight).key
    assert sample_node(six).key == sample_node(prepare(TINY, tmp_path)).key


def test_attention_changes_trace_of_unet_but_not_of_vae(tmp_path):
    split = prepare(TINY, tmp_path)
    original = prepare(write_recipe(tmp_path, "o", f"extends: {TINY}\nname: o\nattention: ORIGINAL\n"), tmp_path)
    a, b = keys(split), keys(original)
    assert a[("trace", "unet")] != b[("trace", "unet")]
    assert a[("trace", "vae_decoder")] == b[("trace", "vae_decoder")]
    assert a[("download", None)] == b[("download", None)]


def test_compile_nodes_only_where_the_compiler_exists_and_keyed_by_its_version(tmp_path, monkeypatch):
    import sdbuild.stages.compile as compile_stage

    assert not [n for n in prepare(TINY, tmp_path).nodes if n.stage.name == "compile"]  # Linux: none
    monkeypatch.setattr(compile_stage, "compiler_available", lambda: True)
    monkeypatch.setattr(compile_stage, "compiler_version", lambda: "coremlcompiler 3400.1")
    nodes = prepare(TINY, tmp_path).nodes
    compiled = {n.component: n for n in nodes if n.stage.name == "compile"}
    assert set(compiled) == {"text_encoder", "unet", "vae_decoder"}
    assert compiled["unet"].deps[0].stage.name == "compress"  # what ships is what is compiled
    monkeypatch.setattr(compile_stage, "compiler_version", lambda: "coremlcompiler 3500.2")
    newer = {n.component: n.key for n in prepare(TINY, tmp_path).nodes if n.stage.name == "compile"}
    assert newer["unet"] != compiled["unet"].key


def keys_after_editing(tmp_path, monkeypatch, module_file: str) -> dict:
    """The tiny recipe's keys as they would be with ``module_file`` (relative to sdbuild/) changed.

    The edit goes into a copy of the package; the executor reads stage code from there.
    """
    import shutil

    from sdbuild import executor

    copy = tmp_path / module_file.replace("/", "-") / "sdbuild"  # a fresh path: digests are remembered by path
    shutil.copytree(executor.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / module_file, "a") as f:
        f.write("\n# an edit\n")
    read = executor.code_digest
    with monkeypatch.context() as m:
        m.setattr(executor, "code_digest", lambda modules: read(modules, copy))
        return keys(prepare(TINY, tmp_path))


def test_a_changed_helper_module_moves_the_keys_of_the_stages_importing_it(tmp_path, monkeypatch):
    before = keys(prepare(TINY, tmp_path))
    components = ("text_encoder", "unet", "vae_decoder")

    def moved(module_file: str) -> set:
        after = keys_after_editing(tmp_path, monkeypatch, module_file)
        return {k for k in before if before[k] != after[k]}

    # The models' shared layers: imported by the unet, text encoder and VAE modules the trace stage loads.
    assert moved("models/layers.py") == set(before) - {("download", None)}
    # PSNR: imported by verify and by the compression package (mixed-bit analysis).
    assert moved("metrics.py") == {("compress", "unet"), *(("verify", c) for c in components), *WHOLE_BUILD}
    # The chunker: verify runs chained parts through it; no chunk stage in this recipe.
    assert moved("mil/chunk.py") == {*(("verify", c) for c in components), *WHOLE_BUILD}
    # The report is written by the executor, after every stage: no key follows it.
    assert moved("report.py") == set()


def test_an_import_the_line_scan_cannot_parse_is_still_followed(tmp_path):
    """A ')' in a comment inside an import's parentheses cut the scanned statement short: it was dropped."""
    from sdbuild import executor

    package = tmp_path / "sdbuild"
    (package / "names").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "names" / "__init__.py").write_text("A = 1\n")
    (package / "plain.py").write_text("X = 1\n")
    (package / "user.py").write_text(
        '"""A docstring line: from nowhere import (something"""\n'
        "from sdbuild.names import (  # noqa: F401 (re-exported)\n    A,\n)\n"
        "from sdbuild import plain\n"
    )
    assert {"sdbuild.names", "sdbuild.plain"} <= executor.imported_modules("sdbuild.user", package)


def test_the_synthetic_tokenizer_corpus_is_in_every_key(tmp_path, monkeypatch):
    """The tiny models' tokenizer is learned from a data file, which no code digest covers."""
    import sdbuild.stages.download as download

    before = keys(prepare(TINY, tmp_path))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(download.CORPUS.read_text() + "\none more line\n")
    monkeypatch.setattr(download, "CORPUS", corpus)
    after = keys(prepare(TINY, tmp_path))
    assert all(after[k] != before[k] for k in before)


def test_sparsity_and_palette_dtype_change_only_compress_and_what_follows(tmp_path):
    base = prepare(write_recipe(tmp_path, "t15", f"extends: {TINY}\nname: t15\ntarget: macOS15\n"), tmp_path)
    a = keys(base)
    for extra in ("sparsity: 0.5", "sparsity: '2:4'", "lut_dtype: int8"):
        variant = f"extends: {TINY}\nname: v\ntarget: macOS15\ncompression: {{nbits: 6, {extra}}}\n"
        b = keys(prepare(write_recipe(tmp_path, "v", variant), tmp_path))
        assert {k for k in a if a[k] != b[k]} == {("compress", "unet"), ("verify", "unet"), *WHOLE_BUILD}, extra


def test_keys_of_recipes_without_the_later_compression_keys_leave_them_out(tmp_path):
    """sparsity, lut_dtype and activations enter the compress key only when set: older keys stay valid."""
    six = prepare(TINY, tmp_path)
    fields = next(n.fields for n in six.nodes if n.stage.name == "compress")
    assert set(fields["compression"]) == {"nbits", "linear8", "mixed_bit", "group_size", "components"}


W8 = f"extends: {TINY}\nname: w\ncompression: {{nbits: null, linear8: true, components: [unet]"


def test_int8_activations_add_calibration_and_change_only_the_unets_compress_and_what_follows(tmp_path):
    a = keys(prepare(write_recipe(tmp_path, "w", W8 + "}\n"), tmp_path))
    b = keys(prepare(write_recipe(tmp_path, "w", W8 + ", activations: int8}\n"), tmp_path))
    assert ("calibrate", "unet") in b and ("calibrate", "unet") not in a
    assert {k for k in b if a.get(k) != b[k]} == {("calibrate", "unet"), ("compress", "unet"), ("verify", "unet"), *WHOLE_BUILD}
    # The calibration set is in the calibrate key, and only what follows it changes.
    c = keys(prepare(write_recipe(tmp_path, "w", W8 + ", activations: int8, calibration: {prompts: [a fox], steps: 3}}\n"), tmp_path))
    assert {k for k in c if b[k] != c[k]} == {("calibrate", "unet"), ("compress", "unet"), ("verify", "unet"), *WHOLE_BUILD}


def test_calibration_runs_the_float16_text_encoder_and_unet_even_where_the_text_encoder_does_not_ship(tmp_path):
    from sdbuild.executor import final_nodes

    shipped = prepare(write_recipe(tmp_path, "w", W8 + ", activations: int8}\n"), tmp_path)
    alone = prepare(write_recipe(tmp_path, "u", W8 + ", activations: int8}\ncomponents: [unet]\n"), tmp_path)
    for build in (shipped, alone):
        calibrate = next(n for n in build.nodes if n.stage.name == "calibrate")
        assert [(d.stage.name, d.component) for d in calibrate.deps] == [("download", None), ("convert", "text_encoder"), ("convert", "unet")]
        compress = next(n for n in build.nodes if n.stage.name == "compress")
        assert calibrate in compress.deps
        order = [n for n in build.nodes]
        assert all(order.index(d) < order.index(n) for n in order for d in n.deps)  # dependency order
    assert keys(alone)[("calibrate", "unet")] == keys(shipped)[("calibrate", "unet")]
    assert set(final_nodes(alone.nodes)) == {"unet"}  # calibrated with it, the text encoder does not ship
    assert "text_encoder" in final_nodes(shipped.nodes)


# --- adding a stage: its module and its declaration ------------------------------------


def declare(monkeypatch, stage, before: str):
    """``STAGES`` with ``stage`` declared before the stage named ``before``, as an edit of
    sdbuild/stages/__init__.py would have it."""
    from sdbuild import executor, stages

    names = list(stages.STAGES)
    at = names.index(before)
    declared = {n: stages.STAGES[n] for n in names[:at]} | {stage.name: stage} | {n: stages.STAGES[n] for n in names[at:]}
    monkeypatch.setattr(stages, "STAGES", declared)
    monkeypatch.setattr(executor, "STAGES", declared)


def test_a_new_stage_is_planned_from_its_declaration_alone(tmp_path, monkeypatch):
    """A toy stage reading each unet's package: a node per unet, after every chain, upstream the
    package (compressed here), keyed on it; the bundle follows it; no other key moves."""
    from sdbuild.stages import PACKAGE_OF, Stage, runner_stages

    before = keys(prepare(TINY, tmp_path))
    audit = Stage("audit", "1", "sdbuild.stages.verify:run", fields=("verify.seed",), consumes=(PACKAGE_OF,),
                  applies=lambda plan, component: component == "unet", runners=("linux", "macos"))
    declare(monkeypatch, audit, before="bundle")
    build = prepare(TINY, tmp_path)
    nodes = {(n.stage.name, n.component): n for n in build.nodes}
    node = nodes[("audit", "unet")]
    assert [n for n in nodes if n[0] == "audit"] == [("audit", "unet")]
    assert node.deps == [nodes[("compress", "unet")]]
    assert node.record["upstream"] == {"compress:unet": nodes[("compress", "unet")].key}
    assert node in nodes[("bundle", None)].deps
    order = [n.label for n in build.nodes]
    assert order.index("convert vae_decoder") < order.index("audit unet") < order.index("bundle")
    after = keys(build)
    assert {k for k in before if before[k] != after[k]} == {("bundle", None)}
    # Keyed on its upstream: a change to the unet's compression moves it; the sample's seed, too.
    eight = prepare(write_recipe(tmp_path, "t8", f"extends: {TINY}\nname: t8\ncompression: {{nbits: 8}}\n"), tmp_path)
    assert keys(eight)[("audit", "unet")] != after[("audit", "unet")]
    seed = prepare(write_recipe(tmp_path, "s", f"extends: {TINY}\nname: s\nverify: {{seed: 7}}\n"), tmp_path)
    assert keys(seed)[("audit", "unet")] != after[("audit", "unet")]
    # Uncompressed, it reads the converted package instead.
    fp16 = prepare(write_recipe(tmp_path, "f", f"extends: {TINY}\nname: f\ncompression: null\n"), tmp_path)
    assert [d.label for d in next(n for n in fp16.nodes if n.stage.name == "audit").deps] == ["convert unet"]
    # The CI runners' split follows the declaration.
    assert "audit" in runner_stages()["linux"] and "audit" in runner_stages()["macos"]


def test_a_new_stage_in_a_chain_is_planned_in_it(tmp_path, monkeypatch):
    """A stage between compress and what ships: declared to consume the package and named in
    what ``chunk`` consumes, it is planned in each component's chain, and chunk reads it."""
    import dataclasses

    from sdbuild import stages
    from sdbuild.stages import PACKAGE_OF, Input, Stage

    sign = Stage("sign", "1", "sdbuild.stages.verify:run", consumes=(PACKAGE_OF,), applies=lambda plan, c: c in stages.UNETS)
    declare(monkeypatch, sign, before="chunk")
    chunk = dataclasses.replace(stages.STAGES["chunk"], consumes=(Input(("sign", *PACKAGE_OF.stages)),))
    monkeypatch.setitem(stages.STAGES, "chunk", chunk)
    monkeypatch.setattr(stages, "SHIPPED", Input(("chunk", "sign", *PACKAGE_OF.stages)))
    from sdbuild import executor

    monkeypatch.setattr(executor, "SHIPPED", stages.SHIPPED)
    recipe = write_recipe(tmp_path, "c", f"extends: {TINY}\nname: c\nchunk: {{unet: 2}}\n")
    build = prepare(recipe, tmp_path)
    order = [n.label for n in build.nodes]
    assert order[order.index("compress unet") + 1 : order.index("compress unet") + 3] == ["sign unet", "chunk unet"]
    nodes = {n.label: n for n in build.nodes}
    assert nodes["chunk unet"].deps == [nodes["sign unet"]]
    assert nodes["sign unet"].deps == [nodes["compress unet"]]


def test_bundle_and_sample_are_declared_stages(tmp_path):
    """Planned and keyed like the others: the bundle after every node, the sample after every verify."""
    build = prepare(TINY, tmp_path)
    *rest, bundle, sample = build.nodes
    assert (bundle.stage.name, sample.stage.name) == ("bundle", "sample")
    assert bundle.deps == rest
    assert sample.deps == [n for n in rest if n.stage.name == "verify"]
    assert "bundle" in sample.stage.after and not any(d.stage.name == "bundle" for d in sample.deps)
    no_sample = prepare(write_recipe(tmp_path, "n", f"extends: {TINY}\nname: n\nverify: {{sample_image: false}}\n"), tmp_path)
    assert [n.stage.name for n in no_sample.nodes][-1] == "bundle"


def test_ci_runners_come_from_the_declarations():
    from sdbuild.stages import STAGES, runner_stages

    runners = runner_stages()
    assert runners["macos"] == ["compile", "verify"]
    assert "compile" not in runners["linux"] and {"download", "convert", "bundle", "verify"} <= set(runners["linux"])
    assert sorted({s for names in runners.values() for s in names}) == sorted(STAGES)


def test_the_sample_stage_runs_no_import_back_up_the_layers():
    """stages/* never import sdbuild.generate (which reads what they write); the sample's function lives there."""
    from sdbuild import executor
    from sdbuild.stages import STAGES

    for name in executor.stage_modules(tuple(f"sdbuild.stages.{s}" for s in STAGES)):
        if name.startswith("sdbuild.stages"):
            assert not any(m.startswith("sdbuild.generate") for m in executor.imported_modules(name)), name
    assert "sdbuild.stages.sample" in executor.stage_modules((STAGES["sample"].run.split(":")[0],))


def test_analyze_keys_its_own_inputs_not_the_resolution(tmp_path):
    """The analysis measures on inputs of its own: they move its key (and what reads it), the resolution does not."""
    mixed = f"extends: {TINY}\nname: m\ncompression: {{nbits: null, mixed_bit: {{recipe: recipe_4.50_bit_mixedpalette%s}}, components: [unet]}}\n"
    base = keys(prepare(write_recipe(tmp_path, "m", mixed % ""), tmp_path))
    default = keys(prepare(write_recipe(tmp_path, "m", mixed % ", analysis: {samples: 1, batch: 1, latent: 16}"), tmp_path))
    assert default == base  # the defaults written out are the defaults: every key, the compress key too
    bigger = keys(prepare(write_recipe(tmp_path, "m", mixed % ", analysis: {latent: 32}"), tmp_path))
    assert {k for k in base if base[k] != bigger[k]} == {("analyze", "unet"), ("compress", "unet"), ("verify", "unet"), *WHOLE_BUILD}
    two = keys(prepare(write_recipe(tmp_path, "m", mixed % ", analysis: {samples: 2}"), tmp_path))
    assert two[("analyze", "unet")] not in (base[("analyze", "unet")], bigger[("analyze", "unet")])
    wider = keys(prepare(write_recipe(tmp_path, "m", mixed % "" + "resolution: {height: 64, width: 96}\n"), tmp_path))
    assert wider[("analyze", "unet")] == base[("analyze", "unet")] and wider[("trace", "unet")] != base[("trace", "unet")]
