"""LoRAs fused at build time (kohya/A1111 and diffusers/PEFT files), checked against diffusers'
``load_lora_weights`` + ``fuse_lora``; textual-inversion embeddings joined to tokenizer and encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import assert_one_line_error, run_cli, run_cli_here, write_recipe

from sdbuild.executor import prepare, run_build
from sdbuild.metrics import psnr
from sdbuild.stages.download import checkpoint_dir

UNET_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2")
TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _lora_pairs(model, layers, seed, rank=4, scale=0.3):
    """(module name, down [rank, in], up [out, rank]) for every Linear named by ``layers``."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(layers):
            down = torch.randn(rank, module.in_features, generator=g) * scale
            up = torch.randn(module.out_features, rank, generator=g) * scale
            pairs.append((name, down, up))
    return pairs


def write_kohya_lora(checkpoint, path, seed=0, rank=4, alpha=2.0):
    """A kohya/A1111 LoRA (``lora_unet_*``, ``lora_te_*`` with ``alpha``) for the SD 1.x folder ``checkpoint``."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet")
    text = CLIPTextModel.from_pretrained(checkpoint / "text_encoder")
    state = {}
    for prefix, model, layers in (("lora_unet_", unet, UNET_LAYERS), ("lora_te_text_model_", text, TEXT_LAYERS)):
        for name, down, up in _lora_pairs(model, layers, seed, rank):
            key = prefix + name.removeprefix("text_model.").replace(".", "_")
            state |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)}
    save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()}, str(path))
    return path


def write_peft_lora(checkpoint, path, seed=1, rank=4):
    """A diffusers/PEFT LoRA (``unet.*.lora_A/B``, ``text_encoder.*.lora_A/B``) for ``checkpoint``."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet")
    text = CLIPTextModel.from_pretrained(checkpoint / "text_encoder")
    state = {}
    for prefix, model, layers in (("unet.", unet, UNET_LAYERS[:4]), ("text_encoder.text_model.", text, TEXT_LAYERS[:4])):
        for name, down, up in _lora_pairs(model, layers, seed, rank):
            name = prefix + name.removeprefix("text_model.")
            state |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def loras(tiny_sd_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {
        "kohya": write_kohya_lora(tiny_sd_checkpoint, root / "kohya.safetensors"),
        "peft": write_peft_lora(tiny_sd_checkpoint, root / "peft.safetensors"),
    }


def _recipe(folder, name, loras=(), embeddings=(), components=("text_encoder", "unet")):
    lines = ["name: " + name, "model:", "  version: synthetic:tiny-sd"]
    if loras:
        lines.append("  loras:")
        lines += [f"    - {{path: {p}, strength: {s}}}" for p, s in loras]
    if embeddings:
        lines.append("  embeddings:")
        lines += [f"    - {{path: {p}, token: {t}}}" for p, t in embeddings]
    lines += [f"components: [{', '.join(components)}]", "attention: ORIGINAL", "resolution: {height: 64, width: 64}", ""]
    return write_recipe(folder, name, "\n".join(lines))


def _diffusers_fused(checkpoint, fused):
    """diffusers' own pipeline with ``fused`` [(file, strength)] loaded and fused, in order."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(checkpoint, safety_checker=None)
    for i, (path, strength) in enumerate(fused):
        pipe.load_lora_weights(str(path), adapter_name=f"a{i}")
        pipe.fuse_lora(lora_scale=strength, adapter_names=[f"a{i}"])
        pipe.unload_lora_weights()
    return pipe


def _unet_and_text_outputs(pipe, seed=0):
    g = np.random.default_rng(seed)
    inputs = {
        "sample": g.standard_normal((2, 4, 8, 8)).astype(np.float32),
        "timestep": np.array([981.0, 17.0], dtype=np.float32),
        "encoder_hidden_states": g.standard_normal((2, 32, 1, 77)).astype(np.float32),
    }
    ids = np.full((1, 77), pipe.tokenizer.eos_token_id, dtype=np.float32)
    ids[0, :6] = pipe.tokenizer("a photo of a cat").input_ids[:6]
    with torch.no_grad():
        context = torch.from_numpy(inputs["encoder_hidden_states"]).squeeze(2).transpose(1, 2)
        noise = pipe.unet(torch.from_numpy(inputs["sample"]), torch.from_numpy(inputs["timestep"]), context).sample.numpy()
        hidden = pipe.text_encoder(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    return inputs, {"input_ids": ids}, noise, hidden


@pytest.mark.parametrize("kind", ["kohya", "peft"])
def test_lora_matches_diffusers_fuse(kind, loras, tiny_sd_checkpoint, warm_artifacts, tmp_path):
    from sdbuild.mil.executor import load_program

    build = prepare(_recipe(tmp_path, f"lora-{kind}", [(loras[kind], 0.8)]), warm_artifacts)
    run_build(build, until="convert")
    package = {
        n.component: build.cache.entry_path("convert", n.key) / "model.mlpackage" for n in build.nodes if n.stage.name == "convert"
    }
    unet_in, text_in, noise, hidden = _unet_and_text_outputs(_diffusers_fused(tiny_sd_checkpoint, [(loras[kind], 0.8)]))
    _, _, plain_noise, plain_hidden = _unet_and_text_outputs(_diffusers_fused(tiny_sd_checkpoint, []))
    got_noise = load_program(package["unet"]).run(unet_in, precision="fp16")["noise_pred"]
    got_hidden = load_program(package["text_encoder"]).run(text_in, precision="fp16")["last_hidden_state"]
    assert psnr(noise, got_noise) >= 35 and psnr(hidden, got_hidden) >= 35
    # The LoRA matters: without it, diffusers' outputs are far from the package's.
    assert psnr(plain_noise, got_noise) < 30 and psnr(plain_hidden, got_hidden) < 30


def test_strength_is_keyed_and_zero_is_no_lora(loras, tiny_sd_checkpoint, tmp_path):
    artifacts = tmp_path / "artifacts"
    keys = {}
    for strength in (0.0, 0.5, 1.0):
        build = prepare(_recipe(tmp_path, f"s{strength}", [(loras["kohya"], strength)], components=["unet"]), artifacts)
        keys[strength] = {n.stage.name: n.key for n in build.nodes}
        if strength == 0.0:
            run_build(build, until="download")
            fused = load_file(checkpoint_dir(build.nodes[0].entry.path) / "unet" / "diffusion_pytorch_model.safetensors")
    plain = prepare(_recipe(tmp_path, "plain", components=["unet"]), artifacts)
    assert len({k["download"] for k in keys.values()} | {plain.nodes[0].key}) == 4
    assert keys[0.5]["trace"] != keys[1.0]["trace"] and keys[0.5]["convert"] != keys[1.0]["convert"]
    original = load_file(tiny_sd_checkpoint / "unet" / "diffusion_pytorch_model.safetensors")
    assert fused.keys() == original.keys()
    assert all(torch.equal(fused[k], original[k]) for k in original)


def test_two_loras_sum_in_order(loras, tiny_sd_checkpoint, tmp_path):
    build = prepare(_recipe(tmp_path, "two", [(loras["kohya"], 0.7), (loras["peft"], -0.4)], components=["unet"]), tmp_path / "a")
    run_build(build, until="download")
    fused = load_file(checkpoint_dir(build.nodes[0].entry.path) / "unet" / "diffusion_pytorch_model.safetensors")
    want = _diffusers_fused(tiny_sd_checkpoint, [(loras["kohya"], 0.7), (loras["peft"], -0.4)]).unet.state_dict()
    assert max(float((fused[k] - want[k]).abs().max()) for k in want) < 1e-5


def test_lora_that_does_not_fit_is_one_line(loras, tmp_path):
    state = load_file(loras["kohya"])
    # A layer tiny-sd does not have (a third down block), and a layer of the wrong width.
    missing = {k.replace("down_blocks_0", "down_blocks_5"): v for k, v in state.items() if "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in k}
    bad = tmp_path / "missing.safetensors"
    save_file(missing, str(bad))
    done = run_cli_here("run", _recipe(tmp_path, "missing", [(bad, 1.0)], components=["unet"]), "--artifacts", tmp_path / "a")
    assert_one_line_error(done, "model.loras[0]", "missing.safetensors", "down_blocks")
    assert done.returncode == 2

    wide = {k: (torch.zeros(4, 48) if k.endswith("lora_down.weight") else v) for k, v in state.items() if "attn1_to_q" in k}
    bad = tmp_path / "wide.safetensors"
    save_file(wide, str(bad))
    done = run_cli_here("run", _recipe(tmp_path, "wide", [(bad, 1.0)], components=["unet"]), "--artifacts", tmp_path / "a")
    assert_one_line_error(done, "model.loras[0]", "attn1.to_q", "width 48")


# --- textual inversion -------------------------------------------------------


def test_embedding_joins_tokenizer_and_encoder(tiny_sd_checkpoint, tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    width = json.loads((tiny_sd_checkpoint / "text_encoder" / "config.json").read_text())["hidden_size"]
    rows = torch.randn(1, width, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "style.safetensors"
    save_file({"emb_params": rows}, str(path))
    build = prepare(_recipe(tmp_path, "emb", embeddings=[(path, "zorblax")], components=["text_encoder"]), tmp_path / "a")
    run_build(build, until="download")
    folder = checkpoint_dir(build.nodes[0].entry.path)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    ids = tokenizer("a zorblax cat").input_ids
    vocab = json.loads((folder / "tokenizer" / "vocab.json").read_text())
    new_id = vocab["zorblax</w>"]
    assert ids == [ids[0], tokenizer("a").input_ids[1], new_id, *tokenizer("cat").input_ids[1:]]
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    assert torch.allclose(encoder.get_input_embeddings().weight[new_id], rows[0])
    # Other words tokenize as before.
    before = CLIPTokenizer.from_pretrained(tiny_sd_checkpoint / "tokenizer")
    assert tokenizer("a photo of an astronaut").input_ids == before("a photo of an astronaut").input_ids


def test_embedding_errors_are_one_line(tiny_sd_checkpoint, tmp_path):
    path = tmp_path / "style.safetensors"
    save_file({"emb_params": torch.zeros(1, 7)}, str(path))
    done = run_cli_here("run", _recipe(tmp_path, "e1", embeddings=[(path, "zorblax")], components=["text_encoder"]), "--artifacts", tmp_path / "a")
    assert_one_line_error(done, "model.embeddings[0]", "7 wide")
    done = run_cli("plan", _recipe(tmp_path, "e2", embeddings=[(path, "<my-style>")], components=["text_encoder"]))
    assert_one_line_error(done, "model.embeddings[0].token", "letters")
    assert done.returncode == 2


def test_sdxl_single_file_with_lora_and_embedding(tmp_path):
    """SDXL: a kohya LoRA (lora_unet_, lora_te1_, lora_te2_) and a clip_l/clip_g embedding on a single file."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from models.single_file import make_single_file

    path, folder = make_single_file("sdxl", tmp_path / "xl.safetensors", seed=5, dtype=torch.float32)
    reference = StableDiffusionXLPipeline.from_pretrained(folder)
    state = {}
    for prefix, model, layers in (
        ("lora_unet_", reference.unet, UNET_LAYERS),
        ("lora_te1_text_model_", reference.text_encoder, TEXT_LAYERS),
        ("lora_te2_text_model_", reference.text_encoder_2, TEXT_LAYERS),
    ):
        for name, down, up in _lora_pairs(model, layers, seed=7):
            key = prefix + name.removeprefix("text_model.").replace(".", "_")
            state |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(4.0)}
    lora = tmp_path / "xl-lora.safetensors"
    save_file(state, str(lora))
    g = torch.Generator().manual_seed(9)
    rows = {"clip_l": torch.randn(1, 64, generator=g), "clip_g": torch.randn(1, 128, generator=g)}
    embedding = tmp_path / "xl-style.safetensors"
    save_file(rows, str(embedding))
    recipe = write_recipe(
        tmp_path,
        "xl",
        f"""name: xl
model:
  version: {path}
  loras: [{{path: {lora}, strength: 0.6}}]
  embeddings: [{{path: {embedding}, token: zorblax}}]
resolution: {{height: 64, width: 64}}
""",
    )
    build = prepare(recipe, tmp_path / "a")
    run_build(build, until="download")
    fused = checkpoint_dir(build.nodes[0].entry.path)
    reference.load_lora_weights(str(lora), adapter_name="x")
    reference.fuse_lora(lora_scale=0.6, adapter_names=["x"])
    reference.unload_lora_weights()
    for component, file, table in (
        ("text_encoder", "model.safetensors", "clip_l"),
        ("text_encoder_2", "model.safetensors", "clip_g"),
        ("unet", "diffusion_pytorch_model.safetensors", None),
    ):
        got, want = load_file(fused / component / file), getattr(reference, component).state_dict()
        assert max(float((got[k] - want[k]).abs().max()) for k in want if "token_embedding" not in k) < 1e-5, component
        if table:
            tokenizer = CLIPTokenizer.from_pretrained(fused / ("tokenizer" if component == "text_encoder" else "tokenizer_2"))
            new_id = tokenizer("zorblax").input_ids[1]
            vocab = json.loads((tokenizer.name_or_path and Path(tokenizer.name_or_path) / "vocab.json").read_text())
            assert tokenizer("zorblax").input_ids == [49406, new_id, 49407] and new_id == vocab["zorblax</w>"] >= 49408
            cls = CLIPTextModel if component == "text_encoder" else CLIPTextModelWithProjection
            encoder = cls.from_pretrained(fused / component)
            assert torch.allclose(encoder.get_input_embeddings().weight[new_id], rows[table][0])
