"""Single-file checkpoints (the original CompVis/A1111 layout) turned into diffusers folders.

The family is read from tensor names and shapes, never from the file name:
SD 1.x, SD 2.x, SDXL base, SDXL refiner, each possibly a 9-channel
inpainting unet. A file gives sizes (widths, depths, vocabulary) but not
every hyperparameter; the rest (32 norm groups, the family's attention head
layout, activations, scheduler) comes from the family's configs shipped in
``sdbuild/data/families/``, with the sizes read from the file written over
them. diffusers' own single-file conversion then maps the weights, one
component at a time so that only that component's tensors are in memory.
No network.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from sdbuild.errors import SdbuildError
from sdbuild.families import INPAINT_CHANNELS, LATENT_CHANNELS, layout_named, single_file_layout

FAMILY_CONFIGS = Path(__file__).parent / "data" / "families"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
PICKLED_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
UNET = "model.diffusion_model."
VAE = "first_stage_model."
# Tensor names of checkpoints we do not convert, and what to call them in the error.
OTHER_KINDS = (
    ("joint_blocks.", "an SD3 checkpoint"),
    ("text_encoders.clip_g.", "an SD3 checkpoint"),
    ("double_blocks.", "a Flux checkpoint"),
    ("single_transformer_blocks.", "a Flux checkpoint"),
    ("lora_unet_", "a LoRA (list it under model.loras, with a base model in model.version)"),
    ("lora_te", "a LoRA (list it under model.loras, with a base model in model.version)"),
    (".lora_A.", "a LoRA (list it under model.loras, with a base model in model.version)"),
    ("control_model.", "a ControlNet (list it under controlnet:)"),
    ("clip_txt_mapper.", "a Stable Cascade checkpoint"),
    ("emb_params", "a textual-inversion embedding (list it under model.embeddings)"),
    ("string_to_param", "a textual-inversion embedding (list it under model.embeddings)"),
)


class CheckpointError(SdbuildError):
    """A single file that is not a checkpoint we can convert."""

    exit_code = 2


@dataclass(frozen=True)
class Detected:
    """What a single file holds: ``family`` (sd1, sd2, sdxl, sdxl-refiner), an inpainting unet or not."""

    family: str
    inpainting: bool
    prediction_type: str  # epsilon | v_prediction

    def describe(self) -> str:
        extra = " inpainting" if self.inpainting else ""
        return f"{layout_named(self.family).label}{extra} ({self.prediction_type})"


def is_single_file(version: str) -> bool:
    return version.lower().endswith(SINGLE_FILE_SUFFIXES)


# --- reading tensors ---------------------------------------------------------


def _pickled_state_dict(path: Path) -> dict:
    import torch

    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files from before torch's zip format cannot be mapped
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a file it cannot unpickle safely
        raise CheckpointError(f"{path}: cannot be read as plain tensors ({type(e).__name__}); convert it to safetensors") from None
    while isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a {type(data).__name__}, not a dictionary of tensors")
    return {k: v for k, v in data.items() if hasattr(v, "shape")}


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor in ``path``; safetensors reads only its header."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return {k: tuple(v.shape) for k, v in _pickled_state_dict(path).items()}
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def load_tensors(path: Path, prefixes: tuple[str, ...], dtype=None) -> dict:
    """The tensors of ``path`` whose names start with one of ``prefixes`` (only those are read).

    With ``dtype``, floating tensors are cast to it one at a time as they are
    read, so the file's own copy of each is freed before the next is read.
    """
    path = Path(path)
    cast = (lambda t: t.to(dtype) if dtype is not None and t.is_floating_point() else t)  # noqa: E731
    if path.suffix.lower() != ".safetensors":
        return {k: cast(v) for k, v in _pickled_state_dict(path).items() if k.startswith(prefixes)}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        sizes = {k: _nbytes(f.get_slice(k)) for k in f.keys() if k.startswith(prefixes)}
    tensors = {}
    for batch in _batches(sizes, MAPPED_BYTES):
        # safetensors maps the file, and each page read counts in this process's memory until the
        # file is closed (as much again as a float16 file's tensors): reopened every MAPPED_BYTES.
        with safe_open(str(path), "pt") as f:
            tensors.update((k, cast(f.get_tensor(k))) for k in batch)
    return tensors


MAPPED_BYTES = 1 << 29  # how much of a safetensors file load_tensors reads before closing it
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


def _nbytes(view) -> int:
    """Bytes of a safetensors slice's tensor (1 per element for 8-bit and boolean types)."""
    count = 1
    for n in view.get_shape():
        count *= n
    return count * DTYPE_BYTES.get(view.get_dtype(), 1)


def _batches(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """The names of ``sizes`` in order, in runs of at most ``limit`` bytes (a larger tensor alone)."""
    batches, total = [[]], 0
    for name, size in sizes.items():
        if batches[-1] and total + size > limit:
            batches.append([])
            total = 0
        batches[-1].append(name)
        total += size
    return [b for b in batches if b]


# --- which family ------------------------------------------------------------


def detect_family(shapes: dict[str, tuple], origin: str, prediction_type: str | None = None) -> Detected:
    """The family of a checkpoint from its tensor names and shapes; ``origin`` names it in errors.

    SD 2.x defaults to v-prediction (SD 2.1 768, as diffusers' loader
    assumes) and SDXL to epsilon; a ``v_pred`` marker tensor says
    v-prediction; ``prediction_type`` (the recipe's) overrides both.
    """
    names = list(shapes)
    has = lambda prefix: any(n.startswith(prefix) for n in names)  # noqa: E731
    if not has(UNET):
        for marker, kind in OTHER_KINDS:
            if any(marker in n for n in names):
                raise CheckpointError(f"{origin}: tensor names look like {kind}, not a Stable Diffusion 1.x/2.x/XL checkpoint")
        sample = ", ".join(names[:3]) or "no tensors"
        raise CheckpointError(f"{origin}: not a Stable Diffusion checkpoint: no {UNET}* tensors (first names: {sample})")
    if has(UNET + "joint_blocks.") or has(UNET + "double_blocks."):
        kind = "an SD3" if has(UNET + "joint_blocks.") else "a Flux"
        raise CheckpointError(f"{origin}: tensor names look like {kind} checkpoint; sdbuild converts SD 1.x, 2.x and SDXL")
    layout = single_file_layout(names)
    if layout is None:
        raise CheckpointError(
            f"{origin}: has a unet but no text encoder this sdbuild knows "
            "(cond_stage_model.* for SD 1.x/2.x, conditioner.embedders.* for SDXL)"
        )
    family = layout.name
    if not has(VAE):
        raise CheckpointError(f"{origin}: {layout.label} unet without a VAE ({VAE}* tensors)")
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    if conv_in is None or len(conv_in) != 4:
        raise CheckpointError(f"{origin}: no {UNET}input_blocks.0.0.weight convolution: not a Stable Diffusion unet")
    if conv_in[1] not in (LATENT_CHANNELS, INPAINT_CHANNELS):
        raise CheckpointError(f"{origin}: the unet takes {conv_in[1]} input channels; sdbuild converts 4 (text to image) or 9 (inpainting)")
    if prediction_type is None:
        prediction_type = "v_prediction" if "v_pred" in shapes else layout.prediction_type
    return Detected(family, conv_in[1] == INPAINT_CHANNELS, prediction_type)


# --- configs: the family's, with the file's sizes ----------------------------


def _indices(shapes: dict, prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for n in shapes if (m := pattern.match(n))})


def unet_config(shapes: dict, family: str, base: dict) -> dict:
    """The unet's diffusers config: the family's ``base`` with the widths and depths ``shapes`` show."""
    s = {k[len(UNET):]: v for k, v in shapes.items() if k.startswith(UNET)}
    levels: list[list[int]] = [[]]
    for block in _indices(s, "input_blocks.")[1:]:
        if f"input_blocks.{block}.0.op.weight" in s:  # a downsampler closes the level
            levels.append([])
        else:
            levels[-1].append(block)
    first = [level[0] for level in levels]
    channels = [s[f"input_blocks.{b}.0.out_layers.3.weight"][0] for b in first]
    attention = [f"input_blocks.{b}.1.proj_in.weight" in s for b in first]
    depths = [len(_indices(s, f"input_blocks.{b}.1.transformer_blocks.")) for b in first]
    mid_depth = len(_indices(s, "middle_block.1.transformer_blocks."))
    to_k = next(v for k, v in s.items() if k.endswith("attn2.to_k.weight"))
    proj_in = next(v for k, v in s.items() if k.endswith(".1.proj_in.weight"))
    config = dict(base)
    config.update(
        in_channels=s["input_blocks.0.0.weight"][1],
        out_channels=s["out.2.weight"][0],
        block_out_channels=channels,
        layers_per_block=len(levels[0]),
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        cross_attention_dim=to_k[1],
        use_linear_projection=len(proj_in) == 2,
    )
    layout = layout_named(family)
    if layout.heads:
        config["attention_head_dim"] = layout.heads  # SD 1.x: eight heads at every width
    else:
        config["attention_head_dim"] = [max(1, c // 64) for c in channels]  # 64-wide heads
    if layout.text_time:
        # Levels without attention take the middle block's depth (the refiner's last level sets the mid block's).
        config["transformer_layers_per_block"] = [d if a else mid_depth for d, a in zip(depths, attention)]
        config["projection_class_embeddings_input_dim"] = s["label_emb.0.0.weight"][1]
    return config


def vae_config(shapes: dict, base: dict) -> dict:
    s = {k[len(VAE):]: v for k, v in shapes.items() if k.startswith(VAE)}
    levels = _indices(s, "encoder.down.")
    config = dict(base)
    config.update(
        block_out_channels=[s[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in levels],
        down_block_types=["DownEncoderBlock2D"] * len(levels),
        up_block_types=["UpDecoderBlock2D"] * len(levels),
        layers_per_block=len(_indices(s, "encoder.down.0.block.")),
        latent_channels=s["decoder.conv_in.weight"][1],
        in_channels=s["encoder.conv_in.weight"][1],
        out_channels=s["decoder.conv_out.weight"][0],
    )
    return config


def text_encoder_config(shapes: dict, prefix: str, kind: str, family: str, base: dict) -> dict:
    """A CLIP text config: the family's, with vocabulary, width, depth, MLP and positions from the file."""
    config = dict(base)
    if kind == "clip":
        # transformers' own names, with or without the text_model level (older files lack it).
        p = prefix + "text_model." if prefix + "text_model.embeddings.token_embedding.weight" in shapes else prefix
        vocab, hidden = shapes[p + "embeddings.token_embedding.weight"]
        layers = len(_indices(shapes, p + "encoder.layers."))
        mlp = shapes[p + "encoder.layers.0.mlp.fc1.weight"][0]
        positions = shapes[p + "embeddings.position_embedding.weight"][0]
    else:
        vocab, hidden = shapes[prefix + "token_embedding.weight"]
        layers = len(_indices(shapes, prefix + "transformer.resblocks."))
        mlp = shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0]
        positions = shapes[prefix + "positional_embedding"][0]
        if layout_named(family).drops_last_text_layer:
            layers -= 1  # SD 2.x conditions on the penultimate layer: diffusers' config drops the last
        if prefix + "text_projection" in shapes and config.get("architectures") == ["CLIPTextModelWithProjection"]:
            config["projection_dim"] = shapes[prefix + "text_projection"][1]
    config.update(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=mlp,
        num_attention_heads=max(1, hidden // 64),  # CLIP's 64-wide heads
        max_position_embeddings=positions,
    )
    return config


# --- conversion --------------------------------------------------------------


def family_configs(shapes: dict, detected: Detected, origin: str) -> dict[str, dict]:
    """Relative path → JSON of the diffusers folder's configs: the family's, with the file's sizes.

    A tensor the family's layout needs but the file lacks is one line naming it.
    """
    family = detected.family
    read = lambda name: json.loads((FAMILY_CONFIGS / family / name).read_text())  # noqa: E731
    try:
        configs = {
            "model_index.json": read("model_index.json"),
            "unet/config.json": unet_config(shapes, family, read("unet/config.json")),
            "vae/config.json": vae_config(shapes, read("vae/config.json")),
            "scheduler/scheduler_config.json": {
                **read("scheduler/scheduler_config.json"),
                "prediction_type": detected.prediction_type,
            },
        }
        for component, prefix, kind in layout_named(family).text_encoders:
            base = read(f"{component}/config.json")
            configs[f"{component}/config.json"] = text_encoder_config(shapes, prefix, kind, family, base)
    except (KeyError, StopIteration, IndexError) as e:
        missing = f"tensor {e.args[0]}" if isinstance(e, KeyError) else "an attention layer"
        raise CheckpointError(f"{origin}: looks like {detected.describe()} but has no {missing}; is the file complete?") from None
    return configs


def write_configs(shapes: dict, detected: Detected, dest: Path) -> None:
    """The diffusers folder's configs and tokenizers, before any weights."""
    from sdbuild.clip_vocab import write_clip_vocabulary

    for name, config in family_configs(shapes, detected, str(dest)).items():
        _write_json(dest / name, config)
    for component, _, kind in layout_named(detected.family).text_encoders:
        # OpenCLIP tokenizers pad with "!", OpenAI CLIP's with the end token.
        tokenizer = "tokenizer" if component == "text_encoder" else "tokenizer_2"
        write_clip_vocabulary(dest / tokenizer, pad_token="!" if kind == "open_clip" else "<|endoftext|>")


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def convert_single_file(path: Path, dest: Path, detected: Detected) -> Path:
    """Write the diffusers folder ``dest`` (created) for the single-file checkpoint ``path``.

    Weights are saved in torch's default dtype (float32), as diffusers' loader
    leaves them. One component at a time: only its tensors are read, already
    in that dtype, so the model takes them as its parameters without a copy
    (a float16 file's tensors and the float32 model are never both in memory).
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path, dest = Path(path), Path(dest)
    shapes = tensor_shapes(path)
    write_configs(shapes, detected, dest)
    dtype = torch.get_default_dtype()  # the dtype of the empty model diffusers loads into
    with torch.no_grad():
        for cls, component, prefix in ((UNet2DConditionModel, "unet", UNET), (AutoencoderKL, "vae", VAE)):
            tensors = load_tensors(path, (prefix,), dtype)
            model = cls.from_single_file(tensors, config=str(dest), subfolder=component, local_files_only=True)
            _check_all_loaded(model, path, component)
            model.save_pretrained(dest / component, safe_serialization=True)
            del model, tensors
        layout = layout_named(detected.family)
        for component, prefix, kind in layout.text_encoders:
            tensors = load_tensors(path, (prefix,), dtype)
            if layout.drops_last_text_layer:
                last = len(_indices(shapes, prefix + "transformer.resblocks.")) - 1
                tensors = {k: v for k, v in tensors.items() if not k.startswith(f"{prefix}transformer.resblocks.{last}.")}
            cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
            model = create_diffusers_clip_model_from_ldm(
                cls, tensors, subfolder=component, config=str(dest), local_files_only=True
            )
            _check_all_loaded(model, path, component)
            model.save_pretrained(dest / component, safe_serialization=True)
            del model, tensors
    return dest


def _check_all_loaded(model, path: Path, component: str) -> None:
    """diffusers loads into empty (meta) weights: any left there had no tensor in the file."""
    missing = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise CheckpointError(f"{path}: {component} weight {missing[0]} is not in the file (and {len(missing) - 1} more)")


def family_configs_digest(family: str) -> str:
    """sha256 over the family's shipped configs: they shape the converted folder, so they are keyed."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted((FAMILY_CONFIGS / family).rglob("*.json")):
        h.update(p.relative_to(FAMILY_CONFIGS).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()
