"""sdbuild's safety checker against diffusers' StableDiffusionSafetyChecker, as a module, a package and in a build.

The decision is a threshold comparison, so the inputs are chosen for it on
the tiny checkpoint: one flagged and one not with a clear margin, and one on
the edge of the special-care boost, whose decision ``adjustment`` flips.
diffusers' ``forward_onnx`` (no rounding, like ours) is the reference; its
constant adjustment of 0 becomes ``a`` by lowering its special-care
thresholds by ``a``, which is what the added term means.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from helpers import run_cli_here, write_recipe
from sdbuild.errors import WeightMismatchError
from sdbuild.metrics import psnr
from sdbuild.models import BuildOptions, build_component
from sdbuild.models.layers import load_weights
from sdbuild.models.safety_checker import SafetyChecker

from .families import ATTENTIONS

MIN_PSNR_FP32 = 60
MIN_PSNR_FP16 = 40
CONTRACT_INPUTS = [("clip_input", [1, 3, 224, 224]), ("images", [1, 512, 512, 3]), ("adjustment", [1])]
# Scores at least this far from a threshold decide the same in float16 (measured: score errors below 1e-3).
MARGIN = 0.02
EDGE = -0.005  # the edge case's best concept score before the boost: in the middle of the boost's 0.01 window


@pytest.fixture(scope="module")
def reference(tiny_sd_checkpoint):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    return StableDiffusionSafetyChecker.from_pretrained(tiny_sd_checkpoint / "safety_checker").eval()


def reference_scores(checker, clip_input):
    """diffusers' best concept score before any special-care boost, and best special-care score, per image."""
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(clip_input)[1])
        concept = cosine_distance(embeds, checker.concept_embeds) - checker.concept_embeds_weights
        special = cosine_distance(embeds, checker.special_care_embeds) - checker.special_care_embeds_weights
    return concept.amax(dim=1), special.amax(dim=1)


def reference_concept_scores(checker, clip_input, adjustment: float) -> np.ndarray:
    """forward_onnx's concept scores (with the special-care boost), which it computes and does not return."""
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(clip_input)[1])
        special = cosine_distance(embeds, checker.special_care_embeds) - checker.special_care_embeds_weights + adjustment
        boost = 0.01 * torch.any(special > 0, dim=1, keepdim=True)
        return (cosine_distance(embeds, checker.concept_embeds) - checker.concept_embeds_weights + boost).numpy()


def reference_flags(checker, clip_input, adjustment: float) -> np.ndarray:
    """diffusers' forward_onnx decisions, with ``adjustment`` in place of its constant 0."""
    shifted = copy.deepcopy(checker)
    with torch.no_grad():
        shifted.special_care_embeds_weights -= adjustment
        _, flags = shifted.forward_onnx(clip_input, torch.zeros(clip_input.shape[0], 8, 8, 3))
    return flags.numpy().astype(np.float32)


@pytest.fixture(scope="module")
def cases(reference):
    """name → (clip_input [1, 3, 224, 224], adjustment): flagged, clean, and the edge case at 0 and at a flipping value."""
    draws = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    concept, special = reference_scores(reference, draws)
    flagged = [i for i in range(8) if concept[i] > MARGIN]
    # Clean even if a special-care hit lowered its thresholds by 0.01.
    clean = [i for i in range(8) if concept[i] < -0.01 - MARGIN]
    assert flagged and clean, f"the tiny checker should flag some standard normal inputs, not all: {concept}"
    hot, cold = draws[flagged[0] : flagged[0] + 1], draws[clean[0] : clean[0] + 1]

    # Along the line from clean to flagged the best concept score is continuous: bisect to EDGE.
    low, high = 0.0, 1.0
    for _ in range(30):
        mid = (low + high) / 2
        score, _ = reference_scores(reference, (1 - mid) * cold + mid * hot)
        low, high = (mid, high) if score.item() < EDGE else (low, mid)
    edge = (1 - low) * cold + low * hot
    score, special = reference_scores(reference, edge)
    assert abs(score.item() - EDGE) < 1e-4
    # An adjustment that turns the special-care hit on (off, if it is on at 0) with a margin.
    flip = -special.item() + (MARGIN if special.item() < 0 else -MARGIN)
    return {"flagged": (hot, 0.0), "clean": (cold, 0.0), "edge": (edge, 0.0), "edge adjusted": (edge, flip)}


def test_cases_span_both_decisions_and_adjustment_flips_one(reference, cases):
    flags = {name: reference_flags(reference, x, a)[0] for name, (x, a) in cases.items()}
    assert flags["flagged"] == 1 and flags["clean"] == 0
    assert flags["edge"] != flags["edge adjusted"]
    assert cases["edge adjusted"][1] != 0


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_matches_diffusers(attention, reference, cases):
    module = SafetyChecker.from_diffusers(reference, attention)
    batch = torch.cat([x for x, _ in cases.values()])
    with torch.no_grad():
        pooled = module.vision_model(batch).flatten(1)
        embeds = module.image_embeds(batch)
        ref_pooled = reference.vision_model(batch)[1]
        ref_embeds = reference.visual_projection(ref_pooled)
    assert embeds.shape == ref_embeds.shape == (4, 32)
    assert psnr(ref_pooled.numpy(), pooled.numpy()) >= MIN_PSNR_FP32
    assert psnr(ref_embeds.numpy(), embeds.numpy()) >= MIN_PSNR_FP32

    images = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    for name, (x, a) in cases.items():
        with torch.no_grad():
            filtered, flags, scores = module(x, images, torch.tensor([a]))
        expected = reference_flags(reference, x, a)
        assert flags.dtype == torch.float32 and flags.shape == (1, 1, 1, 1)  # Apple's converter's shape
        assert flags.numpy().reshape(-1).tolist() == expected.tolist(), name
        assert psnr(reference_concept_scores(reference, x, a), scores.numpy()) >= MIN_PSNR_FP32
        assert torch.equal(filtered, torch.zeros_like(images) if expected[0] else images), name


def test_every_weight_is_loaded_once(reference):
    weights = dict(reference.state_dict())
    module = SafetyChecker(reference.config.vision_config.to_dict(), reference.config.projection_dim)
    with pytest.raises(WeightMismatchError, match="missing: special_care_embeds_weights"):
        load_weights(module, {k: v for k, v in weights.items() if k != "special_care_embeds_weights"}, "checker")
    with pytest.raises(WeightMismatchError, match="unused: extra"):
        load_weights(module, {**weights, "extra": torch.zeros(1)}, "checker")


def test_package_keeps_contract_io_and_decides_as_diffusers(tiny_sd_checkpoint, reference, cases, tmp_path):
    """The trace and convert stages themselves, on the tiny checkpoint; the package run by the reference executor."""
    import coremltools as ct

    from sdbuild.mil.executor import load_program
    from sdbuild.stages import Job, convert, trace

    # `images` is 512×512 whatever the resolution: the Swift package feeds exactly that shape.
    options = BuildOptions(attention="SPLIT_EINSUM", height=64, width=128)
    model = build_component("safety_checker", tiny_sd_checkpoint, options)
    assert [(s.name, s.shape, s.kind) for s in model.inputs] == [
        ("clip_input", (1, 3, 224, 224), "normal"),
        ("images", (1, 512, 512, 3), "pixels"),
        ("adjustment", (1,), "normal"),
    ]
    assert (model.outputs, model.precision) == (["filtered_images", "has_nsfw_concepts", "concept_scores"], "float16")
    assert {s.dtype for s in model.inputs} == {"float16"}

    for folder in ("download", "trace", "convert"):
        (tmp_path / folder).mkdir()
    (tmp_path / "download" / "source.json").write_text(json.dumps({"path": str(tiny_sd_checkpoint)}))
    fields = {"attention": "SPLIT_EINSUM"}
    trace.run(Job("trace", "safety_checker", fields, {"download": tmp_path / "download"}), tmp_path / "trace")
    convert.run(Job("convert", "safety_checker", {"target": "macOS14"}, {"trace": tmp_path / "trace", "download": tmp_path / "download"}), tmp_path / "convert")
    path = tmp_path / "convert" / convert.PACKAGE

    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    types = ct.proto.FeatureTypes_pb2.ArrayFeatureType
    # As Apple's converter declares them: float16 inputs, float32 outputs.
    assert {f.type.multiArrayType.dataType for f in spec.description.input} == {types.FLOAT16}
    assert {f.type.multiArrayType.dataType for f in spec.description.output} == {types.FLOAT32}
    assert [(f.name, list(f.type.multiArrayType.shape)) for f in spec.description.input] == CONTRACT_INPUTS
    assert [(f.name, list(f.type.multiArrayType.shape)) for f in spec.description.output] == [
        ("filtered_images", [1, 512, 512, 3]),
        ("has_nsfw_concepts", [1, 1, 1, 1]),
        ("concept_scores", [1, 17]),
    ]

    program = load_program(path)
    images = np.random.default_rng(0).uniform(0, 1, (1, 512, 512, 3)).astype(np.float32)
    # What Swift feeds as `images` is uninitialized memory: the decision must not read it.
    garbage = np.full((1, 512, 512, 3), np.nan, np.float32)
    for name, (x, a) in cases.items():
        feeds = {"clip_input": x.numpy(), "images": images, "adjustment": np.float32([a])}
        out = program.run(feeds, precision="fp16")
        expected = reference_flags(reference, x, a)
        assert out["has_nsfw_concepts"].reshape(-1).tolist() == expected.tolist(), name
        assert psnr(reference_concept_scores(reference, x, a), out["concept_scores"]) >= MIN_PSNR_FP16
        assert psnr(np.zeros_like(images) if expected[0] else images, out["filtered_images"]) >= MIN_PSNR_FP16
        unfed = program.run({**feeds, "images": garbage}, precision="fp16")["has_nsfw_concepts"]
        assert unfed.reshape(-1).tolist() == expected.tolist(), name


def test_synthetic_checker_is_deterministic(tmp_path):
    from transformers import CLIPImageProcessor

    from sdbuild.synthetic import _safety_checker, _write_feature_extractor

    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        _safety_checker(seed).save_pretrained(tmp_path / name)
        _write_feature_extractor(tmp_path / name)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()
    processor = CLIPImageProcessor.from_pretrained(tmp_path / "a")
    assert processor.crop_size == {"height": 224, "width": 224} and processor.size == {"shortest_edge": 224}


def test_hub_download_takes_safety_checker_and_feature_extractor(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    from sdbuild.stages.download import resolve_source

    hub_files = [
        "model_index.json",
        "safety_checker/config.json",
        "safety_checker/model.safetensors",
        "safety_checker/model.fp16.safetensors",
        "safety_checker/pytorch_model.bin",
        "feature_extractor/preprocessor_config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "v1-5-pruned.ckpt",
    ]
    asked = []

    def snapshot_download(repo, revision, allow_patterns, local_files_only):
        asked.append(allow_patterns)
        folder = tmp_path / "snapshot" / "0123abc"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model_index.json").write_text("{}")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    fetched = {}
    for variant in (None, "fp16"):
        source = resolve_source("someone/sd", "main", variant, allow_pickle=False)
        assert source["kind"] == "hub" and source["commit"] == "0123abc"
        fetched[variant] = set(filter_repo_objects(hub_files, allow_patterns=asked[-1]))
    common = {"model_index.json", "safety_checker/config.json", "feature_extractor/preprocessor_config.json"}
    assert fetched[None] == common | {"safety_checker/model.safetensors", "safety_checker/model.fp16.safetensors",
                                      "unet/diffusion_pytorch_model.safetensors"}  # fmt: skip
    assert fetched["fp16"] == common | {"safety_checker/model.fp16.safetensors"}


def test_build_bundles_and_generate_runs_the_checker(warm_artifacts, reference, tmp_path):
    import coremltools as ct

    from sdbuild.generate import Pipeline, _clip_pixels

    # test_generate's "sd16" recipe plus the checker: in one session every other stage is a cache hit.
    recipe = write_recipe(
        tmp_path,
        "sd-checked",
        "model: {version: 'synthetic:tiny-sd'}\ncomponents: [text_encoder, unet, vae_decoder, safety_checker]\n"
        "chunk: {unet: 2}\nbundle: {layout: both}\nresolution: {height: 64, width: 64}\nverify: {samples: 1}\n",
    )
    done = run_cli_here("run", recipe, "--artifacts", warm_artifacts)
    assert done.returncode == 0, done.stderr[-3000:]
    build = warm_artifacts / "builds" / "sd-checked"
    # Each layout's own checker: the Swift package feeds a 512x512 placeholder, Apple's Python pipeline the image.
    for package, images in (
        (build / "Resources" / "SafetyChecker.mlpackage", [1, 512, 512, 3]),
        (build / "python" / "Stable_Diffusion_version_synthetic:tiny-sd_safety_checker.mlpackage", [1, 64, 64, 3]),
    ):
        spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
        expected = [(name, images if name == "images" else shape) for name, shape in CONTRACT_INPUTS]
        assert [(f.name, list(f.type.multiArrayType.shape)) for f in spec.description.input] == expected
    report = json.loads((build / "build.json").read_text())
    # verify passed: a flipped decision scores at most 0 dB (0/1 values) and stops the build; the
    # figure is the lowest over the outputs, the float16 concept scores' at best.
    assert MIN_PSNR_FP16 <= report["components"]["safety_checker"]["psnr"]["psnr_db"] < 100

    # What `sdbuild generate` runs: the bundle's checker on the decoded image, deciding as diffusers does on it.
    pipe = Pipeline.from_bundle(build, backend="executor")
    result = pipe.generate("a cat", seed=3, steps=1, guidance_scale=2.0)
    assert "safety_checker_s" in result.timings
    decoded = pipe.decode(result.latents)[0]  # the image before any blacking out
    clip_input = torch.from_numpy(_clip_pixels(decoded))
    score, _ = reference_scores(reference, clip_input)
    assert abs(score.item()) > 0.011  # far from the threshold, with or without a special-care boost
    flagged = bool(reference_flags(reference, clip_input, 0.0)[0])
    assert result.nsfw == [flagged]
    assert (result.images[0].max() == 0) == flagged
