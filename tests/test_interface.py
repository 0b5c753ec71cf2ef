"""Every package's interface is the one Apple's converter declares, and Apple's Python pipeline's feeds pass.

Two tiny builds (SD with every component, ControlNet and a chunked unet, both
layouts; SDXL, Python layout) in the shared warm cache. ``apple_signature``
writes down, component by component, the names, dtypes and shapes Apple's
converter (``torch2coreml.py``, with its chunker ``bisect_model``) gives the
same checkpoint at the same size, from the checkpoint's configs; each
package's declared interface must equal it. ``apple_check`` is the exact-type
check Apple's Python pipeline runs before every prediction (its
``CoreMLModel._verify_inputs``: numpy arrays, the declared dtype exactly, the
declared shape exactly, no unknown names); ``test_apple_pipeline_feeds_*``
hand every package what that pipeline hands it, step by step, through that
check and then through the reference executor.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from builds import build_once
from sdbuild.stages.download import checkpoint_dir

SIZE = 64
TOKENS = 77
COMMON = f"resolution: {{height: {SIZE}, width: {SIZE}}}\nverify: {{samples: 1}}\n"
RECIPES = {
    "iface-sd": (
        "model: {version: 'synthetic:tiny-sd'}\n"
        "components: [text_encoder, unet, vae_decoder, vae_encoder, safety_checker]\n"
        "controlnet: [synthetic:tiny-controlnet]\nchunk: {unet: 2}\nbundle: {layout: both}\n" + COMMON
    ),
    "iface-xl": (
        "model: {version: 'synthetic:tiny-sdxl'}\n"
        "components: [text_encoder, text_encoder_2, unet, vae_decoder, vae_encoder]\nbundle: {layout: python}\n" + COMMON
    ),
}
# Apple's Python pipeline's own map from Core ML array data types to numpy dtypes (coreml_model.py).
APPLE_DTYPES = {65552: np.float16, 65568: np.float32, 131104: np.int32}
F16, F32 = "float16", "float32"

def build(artifacts: Path, name: str) -> tuple[Path, Path]:
    """(build folder, checkpoint folder) of recipe ``name``, built once per run."""
    built = build_once(artifacts, name, RECIPES[name])
    return built.build_dir, built.checkpoint


@pytest.fixture(scope="module")
def sd(artifacts):
    return build(artifacts, "iface-sd")


@pytest.fixture(scope="module")
def xl(artifacts):
    return build(artifacts, "iface-xl")


def config(checkpoint: Path, folder: str) -> dict:
    return json.loads((checkpoint / folder / "config.json").read_text())


def spec_of(package: Path):
    from sdbuild.mlpackage import load_spec

    return load_spec(package)


def declared(features) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of each feature, in order."""
    return [
        (f.name, np.dtype(APPLE_DTYPES[f.type.multiArrayType.dataType]).name, tuple(f.type.multiArrayType.shape))
        for f in features
    ]


# --------------------------------------------------------------------------- Apple's converter, as rules


def apple_signature(component: str, checkpoint: Path, layout: str = "python", controlnet: Path | None = None) -> tuple[list, list]:
    """(inputs, outputs) as Apple's converter declares them for ``component`` of ``checkpoint`` at SIZE x SIZE.

    Sample inputs are cast to float16 for the unet family and the safety
    checker; the VAE's input is float32 where the SDXL VAE runs in float32
    (decoder: SDXL without a custom VAE; encoder: SDXL); ``input_ids`` is
    float32; every output float32. The latent is the image over
    2 ** (len(vae block_out_channels) - 1). The safety checker's ``images``:
    the image itself (Python pipeline) or 512x512 (what the Swift package feeds).
    """
    index = json.loads((checkpoint / "model_index.json").read_text())
    xl = "text_encoder_2" in index
    vae = config(checkpoint, "vae")
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    h = w = SIZE // factor
    unet = config(checkpoint, "unet")
    b = 2
    unet_inputs = [
        ("sample", F16, (b, unet["in_channels"], h, w)),
        ("timestep", F16, (b,)),
        ("encoder_hidden_states", F16, (b, unet["cross_attention_dim"], 1, TOKENS)),
    ]
    if component in ("text_encoder", "text_encoder_2"):
        te = config(checkpoint, component)
        pooled = te["projection_dim"] if component == "text_encoder_2" else te["hidden_size"]
        first = "hidden_embeds" if xl else "last_hidden_state"
        return [("input_ids", F32, (1, TOKENS))], [(first, F32, (1, TOKENS, te["hidden_size"])), ("pooled_outputs", F32, (1, pooled))]
    if component == "unet":
        inputs = list(unet_inputs)
        if xl:
            te2 = config(checkpoint, "text_encoder_2")
            inputs += [("time_ids", F16, (b, 6)), ("text_embeds", F16, (b, te2["projection_dim"]))]
        return inputs, [("noise_pred", F32, (b, unet["out_channels"], h, w))]
    if component in ("controlled_unet", "controlnet"):
        residuals = controlnet_residual_shapes(controlnet, b, h, w)
        names = [f"additional_residual_{i}" for i in range(len(residuals))]
        if component == "controlnet":
            cond = ("controlnet_cond", F16, (b, 3, SIZE, SIZE))
            return unet_inputs + [cond], [(n, F32, s) for n, s in zip(names, residuals)]
        return unet_inputs + [(n, F16, s) for n, s in zip(names, residuals)], [("noise_pred", F32, (b, unet["out_channels"], h, w))]
    if component == "vae_decoder":
        dtype = F32 if xl else F16
        return [("z", dtype, (1, vae["latent_channels"], h, w))], [("image", F32, (1, 3, SIZE, SIZE))]
    if component == "vae_encoder":
        dtype = F32 if xl else F16
        return [("x", dtype, (1, 3, SIZE, SIZE))], [("latent", F32, (1, 2 * vae["latent_channels"], h, w))]
    if component == "safety_checker":
        side = config(checkpoint, "safety_checker")["vision_config"]["image_size"]
        ih, iw = (SIZE, SIZE) if layout == "python" else (512, 512)
        inputs = [("clip_input", F16, (1, 3, side, side)), ("images", F16, (1, ih, iw, 3)), ("adjustment", F16, (1,))]
        outputs = [("filtered_images", F32, (1, ih, iw, 3)), ("has_nsfw_concepts", F32, (1, 1, 1, 1)), ("concept_scores", F32, (1, 17))]
        return inputs, outputs
    raise KeyError(component)


def controlnet_residual_shapes(folder: Path, b: int, h: int, w: int) -> list[tuple[int, ...]]:
    """Apple's converter's residual shapes: conv_in, each down block's resnets and downsampler, the mid block."""
    cfg = json.loads((folder / "config.json").read_text())
    channels = cfg["block_out_channels"]
    shapes = [(b, channels[0], h, w)]
    for i, c in enumerate(channels):
        shapes += [(b, c, h, w)] * cfg["layers_per_block"]
        if i < len(channels) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            shapes.append((b, c, h, w))
    return shapes + [(b, channels[-1], h, w)]


def assert_signature(package: Path, expected: tuple[list, list]) -> None:
    spec = spec_of(package)
    assert declared(spec.description.input) == expected[0], package.name
    assert declared(spec.description.output) == expected[1], package.name


def python_package(build_dir: Path, component: str) -> Path:
    from sdbuild.stages.bundle import python_package_name

    version = json.loads((build_dir / "pipeline.json").read_text())["model_version"]
    return build_dir / "python" / python_package_name(version, component)


# --------------------------------------------------------------------------- contract tests, per component


@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae_decoder", "vae_encoder", "safety_checker", "controlled_unet"])
def test_sd_python_layout_declares_what_apples_converter_declares(sd, component, tiny_controlnet_folder):
    build_dir, checkpoint = sd
    expected = apple_signature(component, checkpoint, "python", tiny_controlnet_folder)
    assert_signature(python_package(build_dir, component), expected)


def test_sd_controlnet_declares_what_apples_converter_declares(sd, tiny_controlnet_folder):
    build_dir, checkpoint = sd
    package = build_dir / "python" / "controlnet" / "synthetic:tiny-controlnet.mlpackage"
    assert_signature(package, apple_signature("controlnet", checkpoint, "python", tiny_controlnet_folder))
    swift = build_dir / "Resources" / "controlnet" / "SyntheticTinyControlnet.mlpackage"
    assert_signature(swift, apple_signature("controlnet", checkpoint, "swift", tiny_controlnet_folder))


@pytest.mark.parametrize("component", ["text_encoder", "vae_decoder", "vae_encoder", "safety_checker"])
def test_sd_swift_layout_declares_what_its_clients_take(sd, component):
    """Same interface as the Python layout's, but for the safety checker's 512x512 ``images`` (the Swift package's feed)."""
    from sdbuild.stages.bundle import swift_name

    build_dir, checkpoint = sd
    assert_signature(build_dir / "Resources" / f"{swift_name(component)}.mlpackage", apple_signature(component, checkpoint, "swift"))


@pytest.mark.parametrize("component", ["unet", "controlled_unet"])
def test_chunked_unet_parts_keep_the_interface_and_pass_float32(sd, component, tiny_controlnet_folder):
    """The first part takes the model's inputs as declared; everything between parts is float32; the last ends in noise_pred."""
    from sdbuild.stages.bundle import swift_name

    build_dir, checkpoint = sd
    inputs, outputs = apple_signature(component, checkpoint, "swift", tiny_controlnet_folder)
    parts = [spec_of(build_dir / "Resources" / f"{swift_name(component, i)}.mlpackage") for i in (1, 2)]
    model_inputs = {name: (dtype, shape) for name, dtype, shape in inputs}
    produced: dict[str, tuple] = {}
    for part in parts:
        for name, dtype, shape in declared(part.description.input):
            if name in model_inputs:
                assert (dtype, shape) == model_inputs[name], name
            else:
                assert produced[name] == (dtype, shape) and dtype == F32, name
        for name, dtype, shape in declared(part.description.output):
            produced[name] = (dtype, shape)
            assert dtype == F32, name
    first = [name for name, _, _ in declared(parts[0].description.input)]
    assert first == [name for name, _, _ in inputs if name in first] and first[0] == "sample"
    assert declared(parts[-1].description.output)[-1:] == outputs


@pytest.mark.parametrize("component", ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"])
def test_sdxl_declares_what_apples_converter_declares(xl, component):
    build_dir, checkpoint = xl
    assert_signature(python_package(build_dir, component), apple_signature(component, checkpoint))


def test_a_drifted_interface_fails_the_check(sd):
    """The comparison sees a changed dtype, shape or order: it is not vacuous."""
    build_dir, checkpoint = sd
    inputs, outputs = apple_signature("unet", checkpoint)
    package = python_package(build_dir, "unet")
    for drifted in (
        [(inputs[0][0], F32, inputs[0][2]), *inputs[1:]],
        [(inputs[0][0], inputs[0][1], (1, *inputs[0][2][1:])), *inputs[1:]],
        [inputs[1], inputs[0], *inputs[2:]],
    ):
        with pytest.raises(AssertionError):
            assert_signature(package, (drifted, outputs))


# --------------------------------------------------------------------------- Apple's Python pipeline's feeds


def apple_check(package: Path, feeds: dict) -> None:
    """What Apple's ``CoreMLModel._verify_inputs`` checks, in its words: TypeError/ValueError on any mismatch.

    Also that nothing declared is missing (Core ML itself refuses that).
    """
    expected = {
        f.name: {"shape": tuple(f.type.multiArrayType.shape), "dtype": APPLE_DTYPES[f.type.multiArrayType.dataType]}
        for f in spec_of(package).description.input
    }
    for name, value in feeds.items():
        if name not in expected:
            raise ValueError(f"Received unexpected input kwarg: {name}")
        if not isinstance(value, np.ndarray):
            raise TypeError(f"Expected numpy.ndarray, got {value} for input: {name}")
        if not value.dtype == expected[name]["dtype"]:
            raise TypeError(f"Expected dtype {expected[name]['dtype']}, got {value.dtype} for input: {name}")
        if not value.shape == expected[name]["shape"]:
            raise TypeError(f"Expected shape {expected[name]['shape']}, got {value.shape} for input: {name}")
    missing = set(expected) - set(feeds)
    if missing:
        raise ValueError(f"missing inputs: {sorted(missing)}")


def apple_call(package: Path, **feeds) -> dict:
    """One prediction as Apple's pipeline makes it: the exact check, then the model (reference executor here)."""
    from sdbuild.mil.executor import load_program

    apple_check(package, feeds)
    return load_program(package).run(feeds)


def _encode(build_dir: Path, component: str, ids: np.ndarray) -> dict:
    return apple_call(python_package(build_dir, component), input_ids=ids.astype(np.float32))


def test_apple_check_refuses_what_apples_pipeline_refuses(sd):
    package = python_package(sd[0], "unet")
    spec = {name: (shape, dtype) for name, dtype, shape in declared(spec_of(package).description.input)}
    good = {name: np.zeros(shape, dtype) for name, (shape, dtype) in spec.items()}
    apple_check(package, good)
    with pytest.raises(TypeError, match="Expected dtype .*float16.*, got float32 for input: sample"):
        apple_check(package, dict(good, sample=good["sample"].astype(np.float32)))
    with pytest.raises(TypeError, match="Expected shape"):
        apple_check(package, dict(good, sample=good["sample"][:1]))
    with pytest.raises(ValueError, match="unexpected input"):
        apple_check(package, dict(good, latents=good["sample"]))


def test_apple_pipeline_feeds_pass_every_sd_package(sd, tiny_controlnet_folder):
    """Step by step as Apple's pipeline.py: prompt → unet (plain and with a ControlNet) → VAE → safety checker."""
    build_dir, checkpoint = sd
    rng = np.random.RandomState(93)
    ids = rng.randint(0, 400, size=(1, TOKENS))
    hidden = np.concatenate([_encode(build_dir, "text_encoder", ids[:, ::-1].copy())["last_hidden_state"], _encode(build_dir, "text_encoder", ids)["last_hidden_state"]])
    text_embeddings = hidden.transpose(0, 2, 1)[:, :, None, :]  # (2, C, 1, S)
    unet = python_package(build_dir, "unet")
    latent_shape = tuple(next(f.type.multiArrayType.shape for f in spec_of(unet).description.input if f.name == "sample"))
    latents = rng.randn(1, *latent_shape[1:]).astype(np.float16)
    sample = np.concatenate([latents] * 2)
    timestep = np.array([981, 981], np.float16)
    noise = apple_call(unet, sample=sample.astype(np.float16), timestep=timestep, encoder_hidden_states=text_embeddings.astype(np.float16))
    assert noise["noise_pred"].shape == latent_shape and np.isfinite(noise["noise_pred"]).all()

    cond = rng.rand(1, 3, SIZE, SIZE)
    controlnet = build_dir / "python" / "controlnet" / "synthetic:tiny-controlnet.mlpackage"
    residuals = apple_call(
        controlnet,
        sample=sample.astype(np.float16),
        timestep=timestep.astype(np.float16),
        encoder_hidden_states=text_embeddings.astype(np.float16),
        controlnet_cond=np.concatenate([cond] * 2).astype(np.float16),
    )
    residuals = {k: v.astype(np.float16) for k, v in residuals.items()}  # the pipeline's output_dtype
    controlled = apple_call(
        python_package(build_dir, "controlled_unet"),
        sample=sample.astype(np.float16),
        timestep=timestep,
        encoder_hidden_states=text_embeddings.astype(np.float16),
        **residuals,
    )
    assert controlled["noise_pred"].shape == latent_shape

    decoder = python_package(build_dir, "vae_decoder")
    dtype = APPLE_DTYPES[spec_of(decoder).description.input[0].type.multiArrayType.dataType]  # as decode_latents reads it
    image = apple_call(decoder, z=(1 / 0.18215 * latents.astype(np.float32)).astype(dtype))["image"]
    image = np.clip(image / 2 + 0.5, 0, 1).transpose((0, 2, 3, 1))
    assert image.shape == (1, SIZE, SIZE, 3)
    checked = apple_call(
        python_package(build_dir, "safety_checker"),
        clip_input=rng.randn(1, 3, 224, 224).astype(np.float16),
        images=image.astype(np.float16),
        adjustment=np.array([0.0]).astype(np.float16),
    )
    assert checked["filtered_images"].shape == image.shape
    assert checked["has_nsfw_concepts"].any() or np.allclose(checked["filtered_images"], image, atol=1e-2)


def test_apple_pipeline_feeds_pass_every_sdxl_package(xl):
    build_dir, checkpoint = xl
    rng = np.random.RandomState(93)
    ids = rng.randint(0, 400, size=(1, TOKENS))
    first = _encode(build_dir, "text_encoder", ids)
    second = _encode(build_dir, "text_encoder_2", ids)
    hidden = np.concatenate([first["hidden_embeds"], second["hidden_embeds"]], axis=-1)
    text_embeddings = np.concatenate([hidden] * 2).transpose(0, 2, 1)[:, :, None, :]
    add_time_ids = np.array([SIZE, SIZE, 0, 0, SIZE, SIZE]).astype(text_embeddings.dtype)
    unet = python_package(build_dir, "unet")
    latent_shape = tuple(next(f.type.multiArrayType.shape for f in spec_of(unet).description.input if f.name == "sample"))
    latents = rng.randn(1, *latent_shape[1:]).astype(np.float16)
    noise = apple_call(
        unet,
        sample=np.concatenate([latents] * 2).astype(np.float16),
        timestep=np.array([981, 981], np.float16),
        encoder_hidden_states=text_embeddings.astype(np.float16),
        text_embeds=np.concatenate([second["pooled_outputs"]] * 2).astype(np.float16),
        time_ids=np.concatenate([[add_time_ids], [add_time_ids]]).astype(np.float16),
    )
    assert noise["noise_pred"].shape == latent_shape and np.isfinite(noise["noise_pred"]).all()
    decoder = python_package(build_dir, "vae_decoder")
    dtype = APPLE_DTYPES[spec_of(decoder).description.input[0].type.multiArrayType.dataType]
    image = apple_call(decoder, z=(latents.astype(np.float32) / 0.13025).astype(dtype))["image"]
    assert image.shape == (1, 3, SIZE, SIZE)


# --------------------------------------------------------------------------- latent size from the VAE


def test_latent_is_the_image_over_the_vaes_own_scale_factor(tiny_sd_checkpoint, tmp_path):
    """A VAE that downsamples by 2 and a unet of sample_size 32: a 64x64 image has a [2, 4, 32, 32] sample."""
    import shutil

    from diffusers import AutoencoderKL, UNet2DConditionModel

    from sdbuild.models import BuildOptions, build_component

    folder = tmp_path / "vae2"
    shutil.copytree(tiny_sd_checkpoint, folder)
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    small = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64,
        scaling_factor=vae.config.scaling_factor,
    )  # fmt: skip
    shutil.rmtree(folder / "vae")
    small.save_pretrained(folder / "vae", safe_serialization=True)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    config = dict(unet.config, sample_size=32)
    UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet", safe_serialization=True)

    options = BuildOptions(height=SIZE, width=SIZE)
    model = build_component("unet", folder, options)
    assert [(s.name, s.shape) for s in model.inputs][0] == ("sample", (2, 4, 32, 32))
    assert build_component("vae_decoder", folder, options).inputs[0].shape == (1, 4, 32, 32)
    assert build_component("vae_encoder", folder, options).inputs[0].shape == (1, 3, SIZE, SIZE)
    # The real rule, not a constant: the tiny checkpoint's four-block VAE gives image / 8.
    assert build_component("unet", tiny_sd_checkpoint, options).inputs[0].shape == (2, 4, 8, 8)


# --------------------------------------------------------------------------- metadata


def test_packages_carry_metadata_apps_read(sd):
    from sdbuild.inspect import inspect_path

    build_dir, _ = sd
    facts = inspect_path(build_dir / "python")
    by_name = {p["name"]: p for p in facts["packages"]}
    unet = by_name[python_package(build_dir, "unet").name]
    meta = unet["metadata"]
    assert meta["com.sdbuild.model_version"] == "synthetic:tiny-sd" and meta["version"] == "synthetic:tiny-sd"
    assert meta["com.sdbuild.family"] == "sd" and meta["com.sdbuild.component"] == "unet"
    recipe = json.loads((build_dir / "build.json").read_text())["recipe"]
    assert meta["com.sdbuild.attention"] == recipe["attention"] and meta["com.sdbuild.resolution"] == f"{SIZE}x{SIZE}"
    assert meta["com.sdbuild.compression"] == "float16" and len(meta["com.sdbuild.recipe_key"]) == 16
    assert "com.github.apple.coremltools.conversion_date" not in meta
    for package in facts["packages"]:
        for feature in package["inputs"] + package["outputs"]:
            assert feature["description"] and feature["description"] != feature["name"], (package["name"], feature["name"])


@pytest.fixture(scope="module")
def tiny_controlnet_folder(sd) -> Path:
    """The ControlNet the SD build converted, as its download stage wrote it."""
    build_dir, _ = sd
    report = json.loads((build_dir / "build.json").read_text())
    artifacts = build_dir.parent.parent
    key = next(s["key"] for s in report["stages"] if s["stage"] == "download" and (s["component"] or "").startswith("controlnet/"))
    return checkpoint_dir(artifacts / "cache" / "download" / key)
