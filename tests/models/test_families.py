"""The family table: every family fact is read from it, so a new entry is all a new family needs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from sdbuild.checkpoints import CheckpointError, detect_family
from sdbuild.errors import RecipeError
from sdbuild.executor import components_of, family_of_source, resolve_refiner
from sdbuild.generate.discovery import BundleFiles, _required
from sdbuild.families import (
    FAMILIES,
    SD,
    Family,
    SingleFileLayout,
    family_of_bundle,
    family_of_index,
    family_of_layout,
    register_family,
    unregister_family,
)
from sdbuild.recipe import Recipe
from sdbuild.stages.download import resolve_source

FAMILY_CONFIGS = Path(__file__).parents[2] / "sdbuild" / "data" / "families"
UNET = "model.diffusion_model."


def _shapes(*text_prefixes: str, channels: int = 4) -> dict[str, tuple]:
    """Tensor names and shapes of a minimal single file: a unet's first convolution, a VAE tensor, text encoder tensors."""
    shapes = {UNET + "input_blocks.0.0.weight": (320, channels, 3, 3), "first_stage_model.decoder.conv_in.weight": (512, 4, 3, 3)}
    shapes.update({prefix + "token_embedding.weight": (49408, 768) for prefix in text_prefixes})
    return shapes


@pytest.mark.parametrize("layout", sorted(p.name for p in FAMILY_CONFIGS.iterdir()))
def test_a_published_pipeline_folder_is_the_family_of_its_single_file_layout(layout):
    # The model_index.json shipped for each single-file layout is the published pipeline's own.
    index = json.loads((FAMILY_CONFIGS / layout / "model_index.json").read_text())
    assert family_of_index(index) is family_of_layout(layout)


@pytest.mark.parametrize(
    "prefixes, layout",
    [
        (("cond_stage_model.transformer.",), "sd1"),
        (("cond_stage_model.model.",), "sd2"),
        (("cond_stage_model.model.", "cond_stage_model.transformer."), "sd2"),
        (("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."), "sdxl"),
        (("conditioner.embedders.0.model.",), "sdxl-refiner"),
    ],
)
def test_a_single_file_is_told_by_its_text_encoders(prefixes, layout):
    detected = detect_family(_shapes(*prefixes), "file")
    assert detected.family == layout and not detected.inpainting
    assert detect_family(_shapes(*prefixes, channels=9), "file").inpainting
    # SD 2.x's default prediction type is the table's: v-prediction.
    assert detected.prediction_type == ("v_prediction" if layout == "sd2" else "epsilon")


def test_families_read_their_facts_from_the_table():
    assert [f.name for f in FAMILIES.values()][-1] == "sd"  # the fallback
    assert family_of_index({"_class_name": "SomethingElse"}) is SD
    for name in ("tiny-sd", "tiny-sdxl", "tiny-sdxl-refiner", "tiny-controlnet"):
        # As the download resolves a synthetic model; one no family lists is the fallback's.
        found = family_of_source(resolve_source(f"synthetic:{name}", "main", None, False))
        assert found == {"tiny-sdxl": "sdxl", "tiny-sdxl-refiner": "sdxl-refiner"}.get(name, "sd"), name
    assert family_of_source({"kind": "single_file", "family": "sd2"}) == "sd"
    recipe = Recipe.model_validate({"name": "x", "model": {"version": "synthetic:tiny-sdxl"}})
    assert components_of(recipe, "sdxl") == list(FAMILIES["sdxl"].components)
    # A bundle is told by the text encoders it holds; those, a unet and a VAE decoder are what it needs.
    assert family_of_bundle({"text_encoder": [], "text_encoder_2": [], "unet": []}).name == "sdxl"
    assert family_of_bundle({"text_encoder_2": [], "unet": []}).name == "sdxl-refiner"
    assert _required({"text_encoder_2": []}) == ("text_encoder_2", "unet", "vae_decoder")
    assert _required({}) == ("text_encoder", "unet", "vae_decoder")


TOY_LAYOUT = SingleFileLayout(
    "toy",
    "Toy 1.0",
    requires=("toy_embedder.",),
    text_encoders=(("text_encoder", "toy_embedder.", "clip"),),
    prediction_type="v_prediction",
)
TOY = replace(
    SD,
    name="toy",
    label="a toy model",
    components=("text_encoder", "unet", "vae_decoder", "vae_encoder"),
    scaling_factor=0.5,
    folder_rule=lambda index: index.get("_class_name") == "ToyPipeline",
    single_file=(TOY_LAYOUT,),
    synthetic=("tiny-toy",),
)


@pytest.fixture
def toy_family():
    register_family(TOY)
    try:
        yield TOY
    finally:
        unregister_family("toy")


def test_a_registered_family_is_detected_and_its_components_follow(toy_family):
    # From a folder, a single file, a synthetic name: each reads the table, nothing else needs a change.
    assert family_of_index({"_class_name": "ToyPipeline", "text_encoder": ["transformers", "CLIPTextModel"]}) is TOY
    detected = detect_family(_shapes("toy_embedder."), "toy.safetensors")
    assert (detected.family, detected.prediction_type) == ("toy", "v_prediction")
    assert detected.describe() == "Toy 1.0 (v_prediction)"
    assert family_of_source({"kind": "single_file", "family": "toy"}) == "toy"
    assert family_of_source({"kind": "synthetic", "name": "synthetic:tiny-toy"}) == "toy"
    recipe = Recipe.model_validate({"name": "x", "model": {"version": "synthetic:tiny-toy", "refiner": "synthetic:tiny-sdxl-refiner"}})
    assert components_of(recipe, "toy") == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    # What it may be combined with is the entry's too: no refiner follows a toy model.
    with pytest.raises(RecipeError, match="the base model.version is a toy model; a refiner follows an SDXL base"):
        resolve_refiner(recipe, "toy")
    # Its generation facts: the bundle's family entry gives scaling and scheduler.
    assert FAMILIES["toy"].scaling_factor == 0.5 and FAMILIES["toy"].scheduler == SD.scheduler


def test_a_removed_family_is_no_longer_detected(toy_family):
    unregister_family("toy")
    try:
        assert family_of_index({"_class_name": "ToyPipeline"}) is SD
        with pytest.raises(CheckpointError, match="no text encoder this sdbuild knows"):
            detect_family(_shapes("toy_embedder."), "toy.safetensors")
    finally:
        register_family(TOY)


def test_a_family_name_or_single_file_layout_is_registered_once(toy_family):
    with pytest.raises(ValueError, match="already registered"):
        register_family(TOY)
    with pytest.raises(ValueError, match="layout 'sd1'"):
        register_family(replace(TOY, name="other", single_file=SD.single_file))


def test_bundle_files_family_is_the_tables():
    bundle = BundleFiles(Path("."), Path("."), "swift", "b", {"text_encoder": [], "unet": [], "vae_decoder": []})
    assert bundle.family == "sd" and isinstance(FAMILIES[bundle.family], Family)
