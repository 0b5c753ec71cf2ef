"""lazy_component: build_component's module with the checkpoint's weights bound one layer at a time,
bit for bit the outputs of today's reference (the traced module, saved and loaded, as verify loads
module.pt); chunked attention within float rounding of the whole."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sdbuild.metrics import psnr
from sdbuild.models import BuildOptions, build_component, sample_inputs
from sdbuild.models.attention import attention, original_attention
from sdbuild.models.chunked_attention import chunked_attention, chunked_scores
from sdbuild.models.lazy_weights import NotLazy, lazy_component

OPTIONS = BuildOptions(attention="ORIGINAL", height=64, width=128)
# Chunked attention against the whole: float rounding only (float32 PSNR of the outputs).
CHUNKED_MIN_DB = 100


def traced_reference(model):
    """What verify loaded as its reference: ``model``'s module traced as the trace stage traces it, saved and loaded.

    (Not the in-memory module: transformers leaves its weights in the checkpoint file's memory map, at
    addresses whose alignment picks other float kernels; a loaded module.pt, like a lazily bound one, holds
    each weight in memory of its own.)"""
    import io

    from sdbuild.convert import trace_module

    values = sample_inputs(model.inputs, 0)
    traced = trace_module(model.module, [torch.from_numpy(values[s.name]) for s in model.inputs])
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer).eval()


def outputs(model, module=None, seed=0) -> tuple:
    values = sample_inputs(model.inputs, seed)
    with torch.no_grad():
        out = (module or model.module)(*(torch.from_numpy(values[s.name]) for s in model.inputs))
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize(
    "checkpoint,component,attention_kind",
    [
        ("tiny_sd_checkpoint", "unet", "ORIGINAL"),
        ("tiny_sd_checkpoint", "unet", "SPLIT_EINSUM"),
        ("tiny_sd_checkpoint", "text_encoder", "SPLIT_EINSUM_V2"),
        ("tiny_sd_checkpoint", "vae_decoder", "ORIGINAL"),
        ("tiny_sd_checkpoint", "vae_encoder", "ORIGINAL"),
        ("tiny_sd_checkpoint", "safety_checker", "ORIGINAL"),
        ("tiny_sdxl_checkpoint", "unet", "SPLIT_EINSUM"),
        ("tiny_sdxl_checkpoint", "text_encoder_2", "ORIGINAL"),
    ],
)
def test_bound_a_layer_at_a_time_equals_fully_loaded(checkpoint, component, attention_kind, request):
    folder = request.getfixturevalue(checkpoint)
    options = BuildOptions(attention=attention_kind, height=64, width=128)
    loaded = build_component(component, folder, options)
    model, weights = lazy_component(component, folder, options)
    assert [(s.name, s.shape, s.dtype) for s in model.inputs] == [(s.name, s.shape, s.dtype) for s in loaded.inputs]
    assert all(p.is_meta for p in model.module.parameters())  # nothing read while building
    with weights.bound():
        lazy = outputs(model)
    for a, b in zip(outputs(loaded, traced_reference(loaded)), lazy, strict=True):
        assert torch.equal(a, b)
    # Every weight dropped again after its layer ran.
    assert weights.bound_bytes == 0 and all(p.is_meta for p in model.module.parameters())


def test_at_most_one_layers_weights_are_bound_at_a_time(tiny_sd_checkpoint):
    model, weights = lazy_component("unet", tiny_sd_checkpoint, OPTIONS)
    seen = []
    # As each layer finishes (before its weights go: hooks run in the order registered), what the whole module holds.
    for layer in weights.bindings:
        layer.register_forward_hook(lambda m, args, out: seen.append(sum(
            p.numel() * p.element_size() for p in model.module.parameters() if not p.is_meta)))
    with weights.bound():
        outputs(model)
    total = sum(p.numel() * p.element_size() for p in build_component("unet", tiny_sd_checkpoint, OPTIONS).module.parameters())
    assert len(seen) == len(weights.bindings)
    # Never more than the largest single layer's weights, a small part of the whole.
    assert max(seen) == weights.peak_bytes == weights.largest_group_bytes() < total / 10


def test_weights_read_outside_their_layers_forward_are_bound_around_the_caller(tiny_sd_checkpoint):
    """The text encoder reads its position embedding's weight itself (the embedding never runs): bound
    around the text encoder's forward, the one module that runs with it."""
    model, weights = lazy_component("text_encoder", tiny_sd_checkpoint, OPTIONS)
    position = model.module.embeddings.position_embedding
    assert position not in weights.bindings
    assert any(b.owner is position for b in weights.bindings[model.module])


def test_chunked_attention_is_the_whole_to_float_rounding():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 16, 1, s, generator=g) for s in (300, 77, 77))
    mask = torch.randn(1, 1, 300, 77, generator=g)
    for m in (None, mask):
        whole = original_attention(q, k, v, 4, m)
        one_block = chunked_attention(q, k, v, 4, m)  # 2·4·300·77 scores: one block
        assert torch.equal(one_block, whole)
        blocks = chunked_attention(q, k, v, 4, m, elements=2 * 4 * 77 * 7)  # 7 query rows a block, the last shorter
        assert psnr(whole.numpy(), blocks.numpy()) >= CHUNKED_MIN_DB


@pytest.mark.parametrize("implementation", ["ORIGINAL", "SPLIT_EINSUM", "SPLIT_EINSUM_V2"])
def test_chunked_scores_route_every_implementation_and_restore_it(implementation, monkeypatch):
    import sdbuild.models.chunked_attention as chunked

    calls = []
    monkeypatch.setattr(chunked, "chunked_attention", lambda *a, **k: calls.append(a) or original_attention(*a[:4], a[4]))
    q = torch.randn(1, 8, 1, 20)
    with chunked_scores():
        attention(q, q, q, 2, implementation)
    attention(q, q, q, 2, implementation)
    assert len(calls) == 1


def test_chunked_reference_unet_psnr(tiny_sd_checkpoint, monkeypatch):
    """The tiny unet with its attention in blocks of a few query rows against its whole attention: float rounding only."""
    import sdbuild.models.chunked_attention as chunked

    model, weights = lazy_component("unet", tiny_sd_checkpoint, OPTIONS)
    monkeypatch.setattr(chunked, "SCORE_ELEMENTS", 2 * 8 * 128 * 5)  # 5 query rows of 128 keys a block
    with weights.bound():
        whole = outputs(model)[0]
        with chunked_scores():
            blocks = outputs(model)[0]
    assert psnr(whole.numpy(), blocks.numpy()) >= CHUNKED_MIN_DB


def _checkpoint_copy(source, tmp_path, edit) -> object:
    """A copy of ``source``'s unet folder with ``edit(tensors) -> tensors`` applied to its weights."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "ckpt"
    (folder / "unet").mkdir(parents=True)
    shutil.copy(source / "unet" / "config.json", folder / "unet" / "config.json")
    shutil.copy(source / "model_index.json", folder / "model_index.json")
    weights = source / "unet" / "diffusion_pytorch_model.safetensors"
    save_file(edit(load_file(weights)), folder / "unet" / "diffusion_pytorch_model.safetensors")
    return folder


def test_a_key_the_checkpoint_lacks_is_not_lazy(tiny_sd_checkpoint, tmp_path):
    def drop(tensors):
        tensors.pop("conv_in.bias")
        return tensors

    with pytest.raises(NotLazy, match="lacks conv_in.bias"):
        lazy_component("unet", _checkpoint_copy(tiny_sd_checkpoint, tmp_path, drop), OPTIONS)


def test_a_float16_checkpoint_binds_exactly_its_widened_values(tiny_sd_checkpoint, tmp_path):
    """``.to(float32)`` of the stored float16 values, as from_pretrained and load_weights give them."""
    folder = _checkpoint_copy(tiny_sd_checkpoint, tmp_path, lambda t: {k: v.half() for k, v in t.items()})
    model, weights = lazy_component("unet", folder, OPTIONS)
    with weights.bound():
        lazy = outputs(model)[0]
    loaded = build_component("unet", folder, OPTIONS)
    assert torch.equal(lazy, outputs(loaded, traced_reference(loaded))[0])


def test_a_prefixed_text_encoder_checkpoint_maps_with_its_prefix(tiny_sd_checkpoint, tmp_path):
    """Checkpoints saved by older transformers nest the CLIP text model's keys under ``text_model.``."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_sd_checkpoint / "text_encoder", folder / "text_encoder")
    shutil.copy(tiny_sd_checkpoint / "model_index.json", folder / "model_index.json")
    path = folder / "text_encoder" / "model.safetensors"
    tensors = load_file(path)
    if not any(k.startswith("text_model.") for k in tensors):
        save_file({f"text_model.{k}": v for k, v in tensors.items()}, path)
    model, weights = lazy_component("text_encoder", folder, OPTIONS)
    assert {b.checkpoint.prefix for group in weights.bindings.values() for b in group} == {"text_model."}
    with weights.bound():
        lazy = outputs(model)
    loaded = build_component("text_encoder", tiny_sd_checkpoint, OPTIONS)
    for a, b in zip(outputs(loaded, traced_reference(loaded)), lazy, strict=True):
        assert torch.equal(a, b)


def test_a_weight_changed_after_loading_is_not_lazy(tmp_path):
    """A ``bgr`` ControlNet's first convolution is flipped after loading: not the checkpoint's tensor."""
    from sdbuild.synthetic import make_synthetic

    folder = make_synthetic("synthetic:tiny-controlnet", tmp_path / "cn")
    config = json.loads((folder / "config.json").read_text())
    lazy_component("controlnet", folder, OPTIONS)  # rgb: maps
    (folder / "config.json").write_text(json.dumps({**config, "controlnet_conditioning_channel_order": "bgr"}))
    with pytest.raises(NotLazy, match="controlnet_cond_embedding.conv_in.weight is not a checkpoint tensor as loaded"):
        lazy_component("controlnet", folder, OPTIONS)
