"""Convert one full-size component with random weights and record its cost.

    python tests/models/full_size.py ARCH COMPONENT ATTENTION RESULT.json

ARCH is ``sd15``, ``sd21-base`` or ``sdxl`` (the public configs below; weights
random, seed 0), COMPONENT ``unet``, ``text_encoder`` or ``vae_decoder`` (SDXL:
``unet`` only). It builds the diffusers/transformers module, loads it into
sdbuild's module, checks the two agree in float32 on one input, traces and
converts as the trace and convert stages do (float16, macOS14), runs the
package through sdbuild's reference executor in float16 against the
float32 PyTorch output, and writes wall seconds per phase, peak RSS and the
PSNRs to RESULT.json. One component per process, so peak RSS is that
component's (the float32 check included).
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_BASE_UNET = {
    **SD15_UNET,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "upcast_attention": False,
}
SD15_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
SD21_TEXT = {
    **SD15_TEXT,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "hidden_act": "gelu",
    "projection_dim": 512,
}
SD_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
}
# SDXL base 1.0's unet (public config).
SDXL_UNET = {
    **SD15_UNET,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": True,
}
ARCHS = {
    "sd15": {"unet": SD15_UNET, "text_encoder": SD15_TEXT, "vae_decoder": SD_VAE},
    "sd21-base": {"unet": SD21_BASE_UNET, "text_encoder": SD21_TEXT, "vae_decoder": SD_VAE},
    "sdxl": {"unet": SDXL_UNET},
}
LATENTS = {"sd15": 64, "sd21-base": 64, "sdxl": 128}  # 512×512 and 1024×1024 images


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def build(arch: str, component: str, attention: str):
    """(reference module, our module, inputs name → array, output names, reference outputs fn)."""
    from sdbuild.models.text_encoder import TextEncoder
    from sdbuild.models.unet import Unet
    from sdbuild.models.vae import VaeDecoder

    config = ARCHS[arch][component]
    torch.manual_seed(0)
    g = np.random.default_rng(0)
    latent = LATENTS[arch]
    if component == "unet":
        from diffusers import UNet2DConditionModel

        ref = UNet2DConditionModel(**config).eval()
        ours = Unet.from_diffusers(ref, attention)
        inputs = {
            "sample": g.standard_normal((2, 4, latent, latent)).astype(np.float32),
            "timestep": np.array([981.0, 981.0], dtype=np.float32),
            "encoder_hidden_states": g.standard_normal((2, config["cross_attention_dim"], 1, 77)).astype(np.float32),
        }
        if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text (1280) and six time ids
            inputs["time_ids"] = np.array([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * 2, dtype=np.float32)
            inputs["text_embeds"] = g.standard_normal((2, 1280)).astype(np.float32)

        def reference(t):
            ctx = t["encoder_hidden_states"].squeeze(2).transpose(1, 2)
            added = {"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]} if "text_embeds" in t else None
            return [ref(t["sample"], t["timestep"], ctx, added_cond_kwargs=added, return_dict=False)[0]]

        return ref, ours, inputs, ["noise_pred"], reference
    if component == "text_encoder":
        from transformers import CLIPTextConfig, CLIPTextModel

        ref = CLIPTextModel(CLIPTextConfig(**config)).eval()
        ours = TextEncoder.from_transformers(ref, attention)
        ids = np.full((1, 77), 49407, dtype=np.float32)
        ids[0, 0], ids[0, 1:20] = 49406, g.integers(0, 49406, 19)
        inputs = {"input_ids": ids}

        def reference(t):
            out = ref(t["input_ids"].long())
            return [out.last_hidden_state, out.pooler_output]

        return ref, ours, inputs, ["last_hidden_state", "pooled_outputs"], reference
    from diffusers import AutoencoderKL

    ref = AutoencoderKL(**config).eval()
    ours = VaeDecoder.from_diffusers(ref, attention)
    inputs = {"z": g.standard_normal((1, 4, latent, latent)).astype(np.float32)}
    return ref, ours, inputs, ["image"], lambda t: [ref.decode(t["z"]).sample]


def measure(arch: str, component: str, attention: str) -> dict:
    from sdbuild.compress.package import iter_ops, load_pymil
    from sdbuild.convert import convert_traced, trace_module
    from sdbuild.metrics import psnr
    from sdbuild.mil.executor import load_program

    phases = {}
    start = time.perf_counter()
    ref, ours, inputs, outputs, reference = build(arch, component, attention)
    phases["build_s"] = time.perf_counter() - start

    t0 = time.perf_counter()
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        expected = reference(tensors)
        got = ours(*tensors.values())
    got = got if isinstance(got, tuple) else (got,)
    fp32_psnr = {n: psnr(e.numpy(), o.numpy()) for n, e, o in zip(outputs, expected, got)}
    phases["check_s"] = time.perf_counter() - t0
    expected = [e.numpy() for e in expected]
    del ref, got, reference

    # Trace and convert as the trace and convert stages do (sdbuild.convert: attention left
    # unfilled while tracing, the converter loading module.pt itself, the folding float16 pass).
    params_m = round(sum(p.numel() for p in ours.parameters()) / 1e6, 1)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        traced = trace_module(ours, list(tensors.values()))
        torch.jit.save(traced, str(Path(tmp) / "module.pt"))
        del traced, ours
        phases["trace_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        specs = [{"name": k, "shape": list(v.shape)} for k, v in inputs.items()]
        package = Path(tmp) / "model.mlpackage"
        convert_traced(Path(tmp) / "module.pt", specs, outputs, "float16", "macOS14", package)
        phases["convert_s"] = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
        max_rank = max(len(v.shape) for op in iter_ops(load_pymil(package)) for v in op.outputs)

        t0 = time.perf_counter()
        executed = load_program(package).run(inputs, precision="fp16")
        fp16_psnr = {n: psnr(e, executed[n]) for n, e in zip(outputs, expected)}
        phases["execute_fp16_s"] = time.perf_counter() - t0
    return {
        "arch": arch,
        "component": component,
        "attention": attention,
        "wall_s": round(time.perf_counter() - start, 1),
        "phases_s": {k: round(v, 1) for k, v in phases.items()},
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "fp32_psnr_db": {k: round(v, 1) for k, v in fp32_psnr.items()},
        "fp16_executor_psnr_db": {k: round(v, 1) for k, v in fp16_psnr.items()},
        "max_rank": max_rank,
        "package_mib": round(size / 2**20, 1),
        "params_m": params_m,
        "torch_threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    arch, component, attention, result = sys.argv[1:5]
    Path(result).write_text(json.dumps(measure(arch, component, attention), indent=2))
