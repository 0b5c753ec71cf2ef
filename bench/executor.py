"""Time the reference executor against PyTorch eager.

Two models with random weights: a tiny diffusers UNet2DConditionModel and one
full-size SD 1.5 CrossAttnDownBlock2D (320 channels, 64x64 latents, batch 2,
77x768 text context). Each is traced, converted to a float16 ML program
(iOS17), saved, loaded back and run by the executor in fp32 and fp16 mode.
Prints a table and writes bench/results/executor.json.

    python bench/executor.py [--repeats N] [--skip-full]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")
logging.getLogger("coremltools").setLevel(logging.ERROR)

import coremltools as ct  # noqa: E402

from sdbuild.metrics import psnr  # noqa: E402
from sdbuild.mil.executor import load_program  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "executor.json"


class TupleOut(torch.nn.Module):
    """Traceable wrapper: positional tensors in, the first output tensor out."""

    def __init__(self, module, **fixed):
        super().__init__()
        self.module = module
        self.fixed = fixed

    def forward(self, *args):
        out = self.module(*args, **self.fixed)
        return out[0] if isinstance(out, tuple) else out


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()
    inputs = {
        "sample": torch.randn(2, 4, 32, 32),
        "timestep": torch.tensor([999.0, 999.0]),
        "encoder_hidden_states": torch.randn(2, 77, 32),
    }
    return TupleOut(unet, return_dict=False).eval(), inputs


def sd15_down_block():
    from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D

    torch.manual_seed(0)
    block = CrossAttnDownBlock2D(
        in_channels=320,
        out_channels=320,
        temb_channels=1280,
        num_layers=2,
        resnet_groups=32,
        resnet_eps=1e-5,
        num_attention_heads=8,
        cross_attention_dim=768,
        add_downsample=True,
    ).eval()
    inputs = {
        "hidden_states": torch.randn(2, 320, 64, 64),
        "temb": torch.randn(2, 1280),
        "encoder_hidden_states": torch.randn(2, 77, 768),
    }
    return TupleOut(block).eval(), inputs


def best_of(fns: dict, repeats: int) -> dict:
    """Fastest of ``repeats`` timed calls of each function, in seconds, after one warm-up call each.

    The functions take turns within each repeat, so load from other work on the
    machine falls on all of them alike.
    """
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def bench(name: str, module, inputs: dict, repeats: int, folder: Path) -> dict:
    with torch.inference_mode():
        reference = module(*inputs.values()).numpy()
    start = time.perf_counter()
    with torch.no_grad():
        traced = torch.jit.trace(module, tuple(inputs.values()), check_trace=False)
    mlmodel = ct.convert(
        traced,
        inputs=[ct.TensorType(name=n, shape=t.shape) for n, t in inputs.items()],
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS17,
        compute_precision=ct.precision.FLOAT16,
    )
    path = folder / f"{name}.mlpackage"
    mlmodel.save(str(path))
    convert_s = time.perf_counter() - start
    start = time.perf_counter()
    prog = load_program(path)
    load_s = time.perf_counter() - start
    feeds = {n: t.numpy() for n, t in inputs.items()}
    row = {"model": name, "ops": sum(n for op, n in prog.op_counts().items() if op != "const"),
           "convert_s": convert_s, "load_s": load_s}

    def eager_call():
        with torch.inference_mode():
            module(*inputs.values())

    times = best_of(
        {
            "eager_fp32": eager_call,
            "exec_fp32": lambda: prog.run(feeds, precision="fp32"),
            "exec_fp16": lambda: prog.run(feeds, precision="fp16"),
        },
        repeats,
    )
    row["eager_fp32_s"] = times["eager_fp32"]
    for precision in ("fp32", "fp16"):
        out = list(prog.run(feeds, precision=precision).values())[0]
        row[f"exec_{precision}_s"] = times[f"exec_{precision}"]
        row[f"exec_{precision}_x_eager"] = times[f"exec_{precision}"] / times["eager_fp32"]
        row[f"psnr_{precision}_db"] = psnr(reference, out)
    profile: dict = {}
    prog.run(feeds, precision="fp32", profile=profile)
    row["top_ops_fp32_s"] = dict(sorted(profile.items(), key=lambda kv: -kv[1])[:6])
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-full", action="store_true", help="only the tiny unet")
    args = parser.parse_args(argv)
    cases = [("tiny_unet", tiny_unet)]
    if not args.skip_full:
        cases.append(("sd15_cross_attn_down_block", sd15_down_block))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in cases:
            module, inputs = make()
            rows.append(bench(name, module, inputs, args.repeats, Path(tmp)))
            print(f"done: {name}", file=sys.stderr)
    header = f"{'model':30} {'ops':>5} {'eager fp32':>11} {'exec fp32':>10} {'x':>5} {'exec fp16':>10} {'x':>5} {'dB fp32':>8} {'dB fp16':>8}"
    print(header)
    for r in rows:
        print(
            f"{r['model']:30} {r['ops']:5d} {r['eager_fp32_s']:10.3f}s {r['exec_fp32_s']:9.3f}s {r['exec_fp32_x_eager']:5.2f}"
            f" {r['exec_fp16_s']:9.3f}s {r['exec_fp16_x_eager']:5.2f} {r['psnr_fp32_db']:8.1f} {r['psnr_fp16_db']:8.1f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "coremltools": ct.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "repeats": args.repeats}
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
