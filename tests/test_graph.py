"""The stage graph and its keys, without building anything."""

from __future__ import annotations

from helpers import REPO, write_recipe

from sdbuild.executor import prepare, sample_node

TINY = REPO / "recipes" / "tiny.yaml"


def keys(build) -> dict:
    return {(n.stage.name, n.component): n.key for n in build.nodes}


def test_keys_change_exactly_downstream_of_a_changed_field(tmp_path):
    six = prepare(TINY, tmp_path)
    eight = prepare(write_recipe(tmp_path, "t8", f"extends: {TINY}\nname: t8\ncompression: {{nbits: 8}}\n"), tmp_path)
    a, b = keys(six), keys(eight)
    changed = {k for k in a if a[k] != b[k]}
    assert changed == {("compress", "unet"), ("verify", "unet")}


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
    assert moved("metrics.py") == {("compress", "unet"), *(("verify", c) for c in components)}
    # The chunker: verify runs chained parts through it; no chunk stage in this recipe.
    assert moved("mil/chunk.py") == {("verify", c) for c in components}
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
        assert {k for k in a if a[k] != b[k]} == {("compress", "unet"), ("verify", "unet")}, extra


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
    assert {k for k in b if a.get(k) != b[k]} == {("calibrate", "unet"), ("compress", "unet"), ("verify", "unet")}
    # The calibration set is in the calibrate key, and only what follows it changes.
    c = keys(prepare(write_recipe(tmp_path, "w", W8 + ", activations: int8, calibration: {prompts: [a fox], steps: 3}}\n"), tmp_path))
    assert {k for k in c if b[k] != c[k]} == {("calibrate", "unet"), ("compress", "unet"), ("verify", "unet")}


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
