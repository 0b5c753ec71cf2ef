"""Swift-layout bundles walked the way Apple's Swift package loads them (``swift_loader``).

Each expectation is listed with its Swift source in docs/swift-package.md.
Bundles: the tiny SD model chunked (``sd16``) and whole (``sd6``), tiny SDXL
(``xl16``), all shared with test_generate through the warm cache, and one
with a multilingual projection and a ControlNet, chunked (``ml-cn``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import write_recipe
from swift_loader import Drift, SwiftBPE, read_merges, read_tokenizer, walk_sd, walk_sdxl
from test_generate import build
from tiny_projection import save_projection

CONTROLNET = "SyntheticTinyControlnet"  # controlnet/<Name> of synthetic:tiny-controlnet
ML_CN = """
name: ml-cn
model: {version: synthetic:tiny-sd}
resolution: {height: 64, width: 64}
multilingual_projection: projection.pt
controlnet: [synthetic:tiny-controlnet]
chunk: {unet: 2}
verify: {samples: 1}
"""


@pytest.fixture(scope="module")
def sd16(artifacts) -> Path:
    return build(artifacts, "sd16")[0] / "Resources"


@pytest.fixture(scope="module")
def sd6(artifacts) -> Path:
    return build(artifacts, "sd6")[0] / "Resources"


@pytest.fixture(scope="module")
def xl16(artifacts) -> Path:
    return build(artifacts, "xl16")[0] / "Resources"


@pytest.fixture(scope="module")
def ml_cn(artifacts, tmp_path_factory) -> Path:
    from sdbuild.executor import prepare, run_build

    folder = tmp_path_factory.mktemp("ml-cn")
    save_projection(folder / "projection.pt")
    result = run_build(prepare(write_recipe(folder, "ml-cn", ML_CN), artifacts))
    return result.build_dir / "Resources"


def checkpoint_config(resources: Path, folder: str) -> dict:
    """``folder/config.json`` of the checkpoint the bundle was built from (its download cache entry)."""
    from sdbuild.stages.download import checkpoint_dir

    facts = json.loads((resources.parent / "build.json").read_text())
    download = next(s for s in facts["stages"] if s["stage"] == "download" and s["component"] is None)
    entry = resources.parents[2] / "cache" / "download" / download["key"]
    return json.loads((checkpoint_dir(entry) / folder / "config.json").read_text())


def names(paths) -> list[str]:
    return [p.name for p in paths]


# --- what each pipeline picks and derives ----------------------------------------------------


def test_chunked_bundle_loads_chunks_first(sd16):
    loaded = walk_sd(sd16)
    assert names(loaded.models["unet"]) == ["UnetChunk1.mlpackage", "UnetChunk2.mlpackage"]
    assert names(loaded.models["text_encoder"]) == ["TextEncoder.mlpackage"]
    unet = checkpoint_config(sd16, "unet")
    # 64x64 pixels: the latents the Swift package draws are [1, 4, 8, 8]; one batch-2 unet call.
    assert loaded.latent_shape == (1, unet["in_channels"], 8, 8)
    assert loaded.unet_batch == 2
    assert loaded.sequence_length == 77
    assert loaded.hidden_width == unet["cross_attention_dim"] == checkpoint_config(sd16, "text_encoder")["hidden_size"]


def test_whole_unet_bundle_loads_unet(sd6):
    loaded = walk_sd(sd6)
    assert names(loaded.models["unet"]) == ["Unet.mlpackage"]
    assert loaded.latent_shape == (1, 4, 8, 8)


def test_guidance_below_one_needs_a_batch_one_unet(sd6):
    # Without guidance the Swift package makes one call at batch 1, whatever the unet takes.
    with pytest.raises(Drift, match=r"Unet.mlpackage sample: .*\[1, 4, 8, 8\].*\[2, 4, 8, 8\]"):
        walk_sd(sd6, guidance=False)


def test_sdxl_bundle_loads_as_the_xl_pipeline_does(xl16):
    loaded = walk_sdxl(xl16)
    assert names(loaded.models["unet"]) == ["Unet.mlpackage"]
    assert "unet_refiner" not in loaded.models
    te1, te2 = checkpoint_config(xl16, "text_encoder"), checkpoint_config(xl16, "text_encoder_2")
    assert loaded.hidden_width == te1["hidden_size"] + te2["hidden_size"] == checkpoint_config(xl16, "unet")["cross_attention_dim"]
    assert loaded.sequence_length == 77


def test_multilingual_bundle_with_controlnet_loads_projection_and_controlled_chunks(ml_cn):
    loaded = walk_sd(ml_cn, multilingual=True, controlnets=(CONTROLNET,))
    assert names(loaded.models["multilingual_projection"]) == ["MultilingualTextEncoderProjection.mlpackage"]
    assert names(loaded.models["unet"]) == ["ControlledUnetChunk1.mlpackage", "ControlledUnetChunk2.mlpackage"]
    assert names(loaded.models["controlnet"]) == [f"{CONTROLNET}.mlpackage"]
    assert loaded.sequence_length == 256
    assert loaded.hidden_width == checkpoint_config(ml_cn, "unet")["cross_attention_dim"]
    # Without a ControlNet named, the same bundle runs its plain unet, chunked too.
    plain = walk_sd(ml_cn, multilingual=True)
    assert names(plain.models["unet"]) == ["UnetChunk1.mlpackage", "UnetChunk2.mlpackage"]


def test_multilingual_bundle_has_no_clip_text_encoder(ml_cn):
    with pytest.raises(Drift, match="TextEncoder.mlpackage: missing"):
        walk_sd(ml_cn)


# --- the walk fails on drift -----------------------------------------------------------------


def copy_resources(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, copy_function=shutil.copy)
    return dest


def test_one_chunk_alone_falls_back_to_the_whole_unet(sd16, tmp_path):
    resources = copy_resources(sd16, tmp_path / "Resources")
    shutil.rmtree(resources / "UnetChunk2.mlpackage")
    with pytest.raises(Drift, match="Unet.mlpackage: missing"):
        walk_sd(resources)


def test_clip_text_encoder_beside_a_multilingual_unet_is_drift(sd16, ml_cn, tmp_path):
    resources = copy_resources(ml_cn, tmp_path / "Resources")
    shutil.copytree(sd16 / "TextEncoder.mlpackage", resources / "TextEncoder.mlpackage")
    with pytest.raises(Drift, match=r"encoder_hidden_states: .*\[2, 32, 1, 77\].*\[2, 32, 1, 256\]"):
        walk_sd(resources)


def test_controlnet_named_but_absent_is_drift(sd16):
    with pytest.raises(Drift, match=f"controlnet/{CONTROLNET}.mlpackage: missing"):
        walk_sd(sd16, controlnets=(CONTROLNET,))


def test_merges_without_version_header_is_drift(sd16, tmp_path):
    shutil.copyfile(sd16 / "vocab.json", tmp_path / "vocab.json")
    lines = (sd16 / "merges.txt").read_text().splitlines(keepends=True)
    (tmp_path / "merges.txt").write_text("".join(lines[1:]))
    with pytest.raises(Drift, match="#version"):
        read_tokenizer(tmp_path)


def test_merges_line_with_three_tokens_is_drift(tmp_path):
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\nc d e\n")
    with pytest.raises(Drift, match="merges.txt:3"):
        read_merges(tmp_path / "merges.txt")


# --- the tokenizer files, as the Swift BPE tokenizer reads them -----------------------------


@pytest.mark.parametrize(
    "prompt",
    ["a photo of an astronaut riding a horse on mars", "A Photo of a CAT on a red sofa", "  mountains  at dawn "],
)
def test_swift_bpe_reading_of_the_bundle_tokenizer_matches_clip_tokenizer(sd16, prompt):
    """The bundle's vocab.json/merges.txt give the same ids read the Swift way as through
    transformers' CLIPTokenizer (exact ids for the real CLIP vocabulary: issue 18's tokenizer test)."""
    from transformers import CLIPTokenizer

    swift = read_tokenizer(sd16)
    clip = CLIPTokenizer(vocab=str(sd16 / "vocab.json"), merges=str(sd16 / "merges.txt"))
    expected = clip(prompt, padding="max_length", max_length=77).input_ids
    assert swift.tokenize(prompt, min_count=77) == expected
    assert len(set(expected)) > 4  # merged words, not one id per character


def test_swift_bpe_ranks_merges_by_line():
    bpe = SwiftBPE({("a", "b"): 1, ("b", "c</w>"): 2, ("ab", "c</w>"): 3}, {"<|startoftext|>": 0, "<|endoftext|>": 1, "abc</w>": 5})
    assert bpe.tokenize("ABC") == [0, 5, 1]
    assert bpe.tokenize("abc", min_count=5) == [0, 5, 1, 1, 1]
