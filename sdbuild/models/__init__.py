"""Conversion-friendly PyTorch modules, one per bundle component.

The trace and convert stages call ``build_component`` and nothing else here:
it loads the checkpoint's weights into the module that is traced, and says
which named inputs (with shapes) and outputs the converted model has, as the
bundle contract (CONTRACT.md) fixes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from sdbuild.errors import NotBuiltYet, RecipeError
from sdbuild.families import FAMILIES, Family, family_of_folder, read_model_index  # noqa: F401

TOKENS = 77
MULTILINGUAL_TOKENS = 256  # NLContextualEmbedding's sequence, as the Swift package pads it
SAFETY_CHECKER_IMAGES = 512  # the side of the safety checker's `images` input, fixed by the Swift package
# The safety checker whose `images` input is the generated image itself ([1, H, W, 3]), as Apple's
# Python pipeline feeds it; plain `safety_checker` takes the Swift package's 512x512 placeholder.
SAFETY_CHECKER_IMAGE_SIZED = "safety_checker/python"
# Model I/O data types (docs/interface.md says which input takes which, and why).
FLOAT16, FLOAT32 = "float16", "float32"
COMPONENTS = (
    "text_encoder",
    "text_encoder_2",
    "unet",
    "unet_refiner",
    "controlled_unet",
    "controlnet",
    "vae_decoder",
    "vae_encoder",
    "safety_checker",
)
REFINER_TIME_IDS = 5  # original h, w, crop top, left, aesthetic score (SDXL base: target h, w instead of the score)


@dataclass(frozen=True)
class TensorSpec:
    """One named model input: its shape, and how to draw a valid random value for it.

    ``kind`` is ``normal`` (standard normal), ``tokens`` (integer ids below
    ``high``, held in float32 as the contract says), ``timestep`` (integers
    in [0, high)), ``image`` (uniform in [-1, 1]) or ``pixels`` (uniform in
    [0, 1], as pipelines hand decoded images to the safety checker).
    ``dtype``: the data type the converted model declares for it (``float16``
    or ``float32``), as Apple's converter declares it.
    """

    name: str
    shape: tuple[int, ...]
    kind: str = "normal"
    high: int | None = None
    dtype: str = FLOAT32


@dataclass(frozen=True)
class BuildOptions:
    """The recipe fields that shape a component's module."""

    attention: str = "ORIGINAL"
    height: int = 512  # image pixels
    width: int = 512
    unet_batch_one: bool = False
    sequence_length: int = TOKENS  # of encoder_hidden_states: 256 for a multilingual projection's embeddings
    vae_scale_factor: int = 8  # image pixels per latent pixel: set from the checkpoint by build_component
    checker_images: tuple[int, int] = (SAFETY_CHECKER_IMAGES, SAFETY_CHECKER_IMAGES)  # safety checker `images` H, W

    @property
    def latent(self) -> tuple[int, int]:
        return self.height // self.vae_scale_factor, self.width // self.vae_scale_factor

    @property
    def batch(self) -> int:
        return 1 if self.unet_batch_one else 2


@dataclass
class ComponentModel:
    """A module ready to trace: ``module(*inputs in order)`` returns the outputs in order."""

    module: object  # torch.nn.Module, float32, eval mode
    inputs: list[TensorSpec]
    outputs: list[str]
    precision: str = "float16"  # the converted model's compute precision
    info: dict = field(default_factory=dict)


def build_component(component: str, checkpoint: Path, options: BuildOptions, vae: Path | None = None) -> ComponentModel:
    """Load ``component`` of the diffusers folder ``checkpoint`` as a module to trace.

    The module is sdbuild's own (``unet.py``, ``text_encoder.py``, ``vae.py``,
    ``controlnet.py``, ``safety_checker.py``) with the checkpoint's weights,
    every one of them used (``WeightMismatchError`` otherwise), built for
    ``options.attention``.
    For ``controlnet``, ``checkpoint`` is a ControlNet's own folder
    (config.json and weights), not a pipeline. ``vae``: the folder the VAE
    components load from instead of ``checkpoint / "vae"`` (a custom VAE).
    The latent size is the image size over the VAE's own scale factor
    (``vae_scale_factor``), whatever ``options.vae_scale_factor`` says.
    Every input carries the data type Apple's converter declares for it.
    """
    from sdbuild.models.attention import check_implementation

    if component not in COMPONENTS:
        raise RecipeError(f"unknown component '{component}': choose from {', '.join(COMPONENTS)}")
    checkpoint = Path(checkpoint)
    check_implementation(options.attention)
    if component == "controlnet":
        return _build_controlnet(checkpoint, options)
    family = family_of_folder(checkpoint)
    vae_folder = Path(vae) if vae else checkpoint / "vae"
    if component in ("unet", "unet_refiner", "controlled_unet", "vae_decoder", "vae_encoder"):
        # A folder without a VAE (a unet alone) keeps options.vae_scale_factor, 8 unless set.
        has_vae = (vae_folder / "config.json").is_file()
        factor = vae_scale_factor(_read_config(vae_folder, "VAE")) if has_vae else options.vae_scale_factor
        options = _with_latent_of(options, factor)
    if component in ("text_encoder", "text_encoder_2"):
        return _build_text_encoder(component, checkpoint, family, options)
    if component == "unet":
        return _build_unet(checkpoint, options)
    if component == "unet_refiner":
        return _build_refiner_unet(checkpoint, options)
    if component == "controlled_unet":
        if not family.controlnet:
            from sdbuild.models.controlnet import SDXL_REFUSAL

            raise NotBuiltYet(f"{checkpoint}: {SDXL_REFUSAL}")
        return _build_unet(checkpoint, options, controlled=True)
    if component in ("vae_decoder", "vae_encoder"):
        return _build_vae(component, vae_folder, family, options)
    if component == "safety_checker":
        return _build_safety_checker(checkpoint, options)
    raise NotBuiltYet(f"component '{component}' has no conversion module yet")


def vae_scale_factor(vae_config: dict) -> int:
    """Image pixels per latent pixel: ``2 ** (len(block_out_channels) - 1)``, as diffusers and Apple's converter compute it."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def _read_config(folder: Path, what: str) -> dict:
    if not (folder / "config.json").is_file():
        raise RecipeError(f"{folder}: no config.json: not a diffusers {what} folder")
    return json.loads((folder / "config.json").read_text())


def _with_latent_of(options: BuildOptions, factor: int) -> BuildOptions:
    """``options`` with ``vae_scale_factor`` set; refuses an image size the factor does not divide."""
    if options.height % factor or options.width % factor:
        raise RecipeError(
            f"resolution {options.height}x{options.width}: the VAE turns {factor}x{factor} pixels into one latent;"
            f" height and width must be multiples of {factor}"
        )
    return replace(options, vae_scale_factor=factor)


def _build_text_encoder(component: str, checkpoint: Path, family: Family, options: BuildOptions) -> ComponentModel:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sdbuild.models.text_encoder import TextEncoder

    projected = component == "text_encoder_2"
    cls = CLIPTextModelWithProjection if projected else CLIPTextModel
    reference = cls.from_pretrained(checkpoint / component, use_safetensors=True).eval()
    # SDXL conditions on the penultimate layer's hidden states (both encoders).
    module = TextEncoder.from_transformers(reference, options.attention, penultimate=family.penultimate, sequence_length=TOKENS)
    return ComponentModel(
        module,
        # float32: float16 would round token ids above 2048 before the graph casts them to integers.
        [TensorSpec("input_ids", (1, TOKENS), "tokens", reference.config.vocab_size, FLOAT32)],
        [family.text_output, "pooled_outputs"],
    )


def _time_id_count(checkpoint: Path, config) -> int:
    """How many ``time_ids`` a text_time unet takes: 6 for SDXL base, 5 for the refiner.

    The unet's added-conditioning width is the pooled text width plus one
    sinusoidal embedding per id; the pooled width is text_encoder_2's
    projection width, read from its config (6 ids when there is none).
    """
    te2 = checkpoint / "text_encoder_2" / "config.json"
    if not te2.is_file():
        return 6
    text_dim = json.loads(te2.read_text())["projection_dim"]
    extra = config.projection_class_embeddings_input_dim - text_dim
    if extra <= 0 or extra % config.addition_time_embed_dim:
        raise RecipeError(
            f"{checkpoint}: unet projection_class_embeddings_input_dim {config.projection_class_embeddings_input_dim}"
            f" does not fit text_encoder_2's projection_dim {text_dim}"
        )
    return extra // config.addition_time_embed_dim


def _build_unet(checkpoint: Path, options: BuildOptions, controlled: bool = False) -> ComponentModel:
    """The unet; ``controlled``: the one that also takes ControlNet residuals (``additional_residual_i``)."""
    from diffusers import UNet2DConditionModel

    from sdbuild.models.controlnet import ControlledUnet, residual_names
    from sdbuild.models.unet import Unet

    reference = UNet2DConditionModel.from_pretrained(checkpoint / "unet", use_safetensors=True).eval()
    cfg = reference.config
    h, w = options.latent
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    if h % factor or w % factor:
        raise RecipeError(
            f"resolution {options.height}x{options.width}: the unet needs height and width divisible by"
            f" {options.vae_scale_factor * factor}"
        )
    module = (ControlledUnet if controlled else Unet).from_diffusers(reference, options.attention)
    b = options.batch
    # float16, every one: Apple's Python pipeline feeds the unet float16 arrays and checks the dtype exactly.
    inputs = [
        TensorSpec("sample", (b, cfg.in_channels, h, w), dtype=FLOAT16),
        TensorSpec("timestep", (b,), "timestep", 1000, FLOAT16),
        TensorSpec("encoder_hidden_states", (b, cfg.cross_attention_dim, 1, options.sequence_length), dtype=FLOAT16),
    ]
    info = {"upcast_attention": bool(cfg.upcast_attention), "skip_shapes": module.skip_shapes(b, h, w)}
    if module.text_time:
        n_ids = _time_id_count(checkpoint, cfg)
        text_dim = cfg.projection_class_embeddings_input_dim - n_ids * cfg.addition_time_embed_dim
        # time_ids before text_embeds, as Apple's converter orders them.
        inputs += [TensorSpec("time_ids", (b, n_ids), dtype=FLOAT16), TensorSpec("text_embeds", (b, text_dim), dtype=FLOAT16)]
    if controlled:
        shapes = info["skip_shapes"]
        inputs += [TensorSpec(name, shape, dtype=FLOAT16) for name, shape in zip(residual_names(len(shapes)), shapes)]
    return ComponentModel(module, inputs, ["noise_pred"], info=info)


def _build_refiner_unet(checkpoint: Path, options: BuildOptions) -> ComponentModel:
    """The SDXL refiner's unet (``UnetRefiner``), from the refiner's own folder; refuses any other unet."""
    model = _build_unet(checkpoint, options)
    ids = next((s.shape[-1] for s in model.inputs if s.name == "time_ids"), None)
    if ids != REFINER_TIME_IDS:
        what = f"its unet takes {ids} time_ids" if ids else "its unet takes no time_ids"
        raise RecipeError(
            f"model.refiner {checkpoint}: not an SDXL refiner ({what}; a refiner's take {REFINER_TIME_IDS}, the aesthetic score last)"
        )
    return model


def _build_controlnet(folder: Path, options: BuildOptions) -> ComponentModel:
    """One ControlNet from its diffusers folder; outputs ``additional_residual_0…N`` (``info['residual_shapes']``)."""
    from diffusers import ControlNetModel

    from sdbuild.models.controlnet import ControlNet, check_controlnet_config, residual_names

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise RecipeError(f"{folder}: no config.json: not a diffusers ControlNet folder")
    config = json.loads(config_file.read_text())
    if config.get("_class_name") != "ControlNetModel":
        raise RecipeError(f"{folder}: config.json describes a {config.get('_class_name')!r}, not a ControlNetModel")
    # Refuse before loading weights: an unsupported full-size ControlNet is over a gigabyte.
    check_controlnet_config(config)
    # The control image is at pixel size; its embedding brings it down to the latent size (the base VAE's factor).
    embedding = config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))
    options = _with_latent_of(options, 2 ** (len(embedding) - 1))
    h, w = options.latent
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    if h % factor or w % factor:
        raise RecipeError(
            f"resolution {options.height}x{options.width}: the ControlNet needs height and width divisible by"
            f" {options.vae_scale_factor * factor}"
        )
    reference = ControlNetModel.from_pretrained(folder, use_safetensors=True).eval()
    module = ControlNet.from_diffusers(reference, options.attention)
    cfg = module.config
    b = options.batch
    inputs = [  # float16, as the unet's
        TensorSpec("sample", (b, cfg["in_channels"], h, w), dtype=FLOAT16),
        TensorSpec("timestep", (b,), "timestep", 1000, FLOAT16),
        TensorSpec("encoder_hidden_states", (b, cfg["cross_attention_dim"], 1, options.sequence_length), dtype=FLOAT16),
        TensorSpec("controlnet_cond", (b, cfg.get("conditioning_channels", 3), options.height, options.width), "image", dtype=FLOAT16),
    ]
    shapes = module.residual_shapes(b, h, w)
    info = {"upcast_attention": bool(cfg.get("upcast_attention")), "residual_shapes": shapes}
    return ComponentModel(module, inputs, residual_names(len(shapes)), info=info)


def _build_vae(component: str, folder: Path, family: Family, options: BuildOptions) -> ComponentModel:
    """``folder``: an AutoencoderKL's diffusers folder (the checkpoint's ``vae/`` or a recipe's custom VAE).

    Input dtype as Apple's converter declares it: float32 where the VAE runs
    in float32 (SDXL's own VAE), float16 otherwise; the SDXL encoder's ``x``
    is float32 even with an fp16-safe custom VAE (Apple's converter keys it
    on the family alone).
    """
    from diffusers import AutoencoderKL

    from sdbuild.models.vae import VaeDecoder, VaeEncoder, needs_float32

    if not (folder / "config.json").is_file():
        raise RecipeError(f"{folder}: no config.json: not a diffusers VAE folder")
    reference = AutoencoderKL.from_pretrained(folder, use_safetensors=True).eval()
    # SDXL's VAE overflows in float16 (its config says force_upcast).
    precision = "float32" if needs_float32(reference.config) else "float16"
    h, w = options.latent
    if component == "vae_decoder":
        module = VaeDecoder.from_diffusers(reference, options.attention)
        spec = TensorSpec("z", (1, reference.config.latent_channels, h, w), dtype=precision)
        return ComponentModel(module, [spec], ["image"], precision)
    module = VaeEncoder.from_diffusers(reference, options.attention)
    dtype = FLOAT32 if family.vae_encoder_float32 else precision
    spec = TensorSpec("x", (1, 3, options.height, options.width), "image", dtype=dtype)
    return ComponentModel(module, [spec], ["latent"], precision)


def _build_safety_checker(checkpoint: Path, options: BuildOptions) -> ComponentModel:
    """The NSFW classifier: clip_input [1, 3, 224, 224], images [1, H, W, 3], adjustment [1]
    → filtered_images [1, H, W, 3], has_nsfw_concepts [1, 1, 1, 1], concept_scores [1, 17].

    224 is the checkpoint's vision image size; the image to judge comes in
    through ``clip_input``, ``images`` is only passed through (blacked out
    when flagged). H, W is ``options.checker_images``: 512×512 by default,
    as Apple's Swift package feeds an array of exactly that shape whatever
    the image size (Core ML refuses any other), or the image size itself for
    the variant Apple's Python pipeline feeds its generated image to
    (``SAFETY_CHECKER_IMAGE_SIZED``). Inputs float16, outputs in the order
    and shapes Apple's converter gives them.
    """
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    from sdbuild.models.safety_checker import SafetyChecker

    folder = checkpoint / "safety_checker"
    if not (folder / "config.json").is_file():
        raise RecipeError(f"{checkpoint}: no safety_checker/config.json: this checkpoint ships no safety checker")
    reference = StableDiffusionSafetyChecker.from_pretrained(folder, use_safetensors=True).eval()
    module = SafetyChecker.from_diffusers(reference, options.attention)
    size = module.image_size
    height, width = options.checker_images
    inputs = [
        TensorSpec("clip_input", (1, 3, size, size), dtype=FLOAT16),
        TensorSpec("images", (1, height, width, 3), "pixels", dtype=FLOAT16),
        TensorSpec("adjustment", (1,), dtype=FLOAT16),
    ]
    return ComponentModel(module, inputs, ["filtered_images", "has_nsfw_concepts", "concept_scores"])


def as_declared(feeds: dict[str, np.ndarray], inputs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """``feeds`` cast to each input's declared dtype (round to nearest), as Apple's pipelines hand them over."""
    import numpy as np

    return {spec.name: np.asarray(feeds[spec.name]).astype(spec.dtype) for spec in inputs if spec.name in feeds}


def build_multilingual_projection(path: Path, checkpoint: Path) -> ComponentModel:
    """The user's TorchScript projection (``multilingual.py``) as Apple's converter shapes it.

    ``nlcontextualembeddings_output`` [1, 256, 512] → ``encoder_hidden_states``
    [1, C, 1, 256], C the unet's ``cross_attention_dim`` in ``checkpoint``.
    Float16 compute, float32 input and output, as Apple's converter declares.
    """
    from sdbuild.models.multilingual import EMBEDDING_TOKENS, EMBEDDING_WIDTH, INPUT_NAME, OUTPUT_NAME, load_projection

    config = Path(checkpoint) / "unet" / "config.json"
    width = json.loads(config.read_text())["cross_attention_dim"]
    module = load_projection(Path(path), width)
    inputs = [TensorSpec(INPUT_NAME, (1, EMBEDDING_TOKENS, EMBEDDING_WIDTH))]
    return ComponentModel(module, inputs, [OUTPUT_NAME], info={"projection_layout": "BSC" if module.sequence_first else "BC1S"})


def sample_inputs(inputs: list[TensorSpec], seed: int) -> dict[str, np.ndarray]:
    """Seeded random float32 values for ``inputs``, each valid for its kind (``as_declared`` casts them)."""
    import numpy as np  # here, not at the top: planning reads this package's configs only

    rng = np.random.default_rng(seed)
    out = {}
    for spec in inputs:
        if spec.kind == "tokens":
            # Start and end tokens as a tokenizer would place them, random ids between.
            ids = rng.integers(0, spec.high - 2, size=spec.shape)
            ids[..., 0] = spec.high - 2
            ids[..., -1] = spec.high - 1
            out[spec.name] = ids.astype(np.float32)
        elif spec.kind == "timestep":
            out[spec.name] = rng.integers(0, spec.high or 1000, size=spec.shape).astype(np.float32)
        elif spec.kind == "image":
            out[spec.name] = rng.uniform(-1, 1, size=spec.shape).astype(np.float32)
        elif spec.kind == "pixels":
            out[spec.name] = rng.uniform(0, 1, size=spec.shape).astype(np.float32)
        else:
            out[spec.name] = rng.standard_normal(size=spec.shape).astype(np.float32)
    return out
