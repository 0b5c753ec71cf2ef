"""Benchmark: peak memory and time of loading a full-size SDXL single file, against the diffusers-folder path.

    .venv/bin/python bench/single_file.py                  # full size: bench/results/single-file-sdxl.json
    .venv/bin/python bench/single_file.py --tiny           # the code path on a tiny SDXL (no result file)

An SDXL base model with random weights (seed 0; the public configs: unet
``tests/models/full_size.py`` ARCHS["sdxl"], the SD VAE with SDXL's scaling
factor, CLIP ViT-L/14 and OpenCLIP bigG text encoders) is saved once as a
float16 diffusers folder, then written as ONE ``.safetensors`` file in the
original (SGM) layout with the tests' inverse mapping
(``tests/models/single_file.py``). Both are made in a child process and
cached under ``--cache``; making them is not measured.

Measured, each stage function in a fresh child process as a build runs it
(``sdbuild.executor.run_in_child``; ``peak_rss_gib`` is that process tree's
peak RSS, the larger of the sampler's and the process's own high-water mark):

- ``single_file_download``: the download stage on the file (family detected,
  converted to a diffusers folder: ``sdbuild.checkpoints.convert_single_file``);
- ``folder_download``: the download stage on the diffusers folder (a pointer);
- ``folder_trace_unet``: the trace stage of the unet from the folder (loads
  the unet's weights; 1024x1024, attention ORIGINAL);
- ``single_file_trace_unet``: the same trace from the single file's converted folder.

The load average before and after goes into the JSON: timings mean something
only on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
RESULTS = ROOT / "bench" / "results"
GiB = 2**30

CLIP_IDS = {"bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407, "vocab_size": 49408,
            "max_position_embeddings": 77, "layer_norm_eps": 1e-5}  # fmt: skip
# CLIP ViT-L/14's text model (SDXL's first encoder) and OpenCLIP ViT-bigG's (its second, projected).
CLIP_L = {**CLIP_IDS, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
          "intermediate_size": 3072, "hidden_act": "quick_gelu", "projection_dim": 768}  # fmt: skip
OPEN_CLIP_G = {**CLIP_IDS, "hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 20,
               "intermediate_size": 5120, "hidden_act": "gelu", "projection_dim": 1280}  # fmt: skip


def make_folder(dest: Path) -> None:
    """A full-size SDXL base diffusers folder, random weights (seed 0), float16, one component in memory at a time."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from models.full_size import ARCHS, SD_VAE
    from sdbuild.checkpoints import FAMILY_CONFIGS
    from sdbuild.clip_vocab import write_clip_vocabulary

    builders = {
        "unet": lambda: UNet2DConditionModel(**ARCHS["sdxl"]["unet"]),
        "vae": lambda: AutoencoderKL(**SD_VAE, scaling_factor=0.13025, force_upcast=True),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L)),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**OPEN_CLIP_G)),
    }
    for component, build in builders.items():
        torch.manual_seed(0)
        model = build().eval().to(torch.float16)
        model.save_pretrained(dest / component, safe_serialization=True)
        del model
    write_clip_vocabulary(dest / "tokenizer")
    write_clip_vocabulary(dest / "tokenizer_2", pad_token="!")  # OpenCLIP pads with "!"
    for name in ("model_index.json", "scheduler/scheduler_config.json"):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_text((FAMILY_CONFIGS / "sdxl" / name).read_text())


def make_models(cache: Path, tiny: bool) -> None:
    """The diffusers folder and the single file written from it (in ``cache``), each once."""
    import torch

    from models.single_file import make_family, write_single_file

    folder, single = models(cache, tiny)
    if not (folder / "model_index.json").is_file():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        if tiny:
            make_family("sdxl", partial)
        else:
            make_folder(partial)
        partial.rename(folder)
    if not single.is_file():
        partial = single.with_name(single.name + ".partial")
        write_single_file(folder, "sdxl", partial, dtype=torch.float16)
        partial.rename(single)


def models(cache: Path, tiny: bool) -> tuple[Path, Path]:
    name = "sdxl-tiny" if tiny else "sdxl"
    return cache / f"{name}.diffusers", cache / f"{name}.safetensors"


def stage(name: str, component: str | None, fields: dict, upstream: dict, out: Path, work: Path) -> dict:
    """Run one stage function in a child process as a build does; seconds, peak RSS, the stage's facts."""
    from sdbuild.executor import run_in_child
    from sdbuild.stages import STAGES, Job

    out.mkdir(parents=True)
    job = Job(name, component, fields, upstream, build_name="bench")
    load_before = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    facts = run_in_child(STAGES[name].run, job, out, work / f"{out.name}.log")
    seconds = time.perf_counter() - started
    row = {
        "seconds": round(seconds, 1),
        "peak_rss_gib": round(facts.pop("peak_rss_bytes") / GiB, 2),
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    if facts.get("phases_s"):
        row["phases_s"] = facts["phases_s"]
    print(f"{out.name}: {row}", file=sys.stderr, flush=True)
    return row


def measure(args) -> dict:
    from sdbuild.cache import sha256_file
    from sdbuild.stages.download import resolve_source

    folder, single = models(args.cache, args.tiny)
    side = 256 if args.tiny else 1024
    trace_fields = {"attention": "ORIGINAL", "resolution": {"height": side, "width": side}, "multires": None,
                    "unet_batch_one": False, "encoder_sequence_length": None}  # fmt: skip
    result = {
        "model": "sdxl-tiny" if args.tiny else "sdxl",
        "single_file_bytes": single.stat().st_size,
        "folder_bytes": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()),
        "resolution": side,
        "attention": "ORIGINAL",
        "cpus": len(os.sched_getaffinity(0)),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "stages": {},
    }
    # Resolving hashes the file and the folder (in the build's own process, before any stage): not measured.
    single_source = resolve_source(str(single), "main", None, False)
    wants_folder = any(name.startswith("folder_") for name in args.stages)
    folder_source = resolve_source(str(folder), "main", None, False) if wants_folder else None
    result["detected"] = {k: single_source[k] for k in ("family", "inpainting", "prediction_type")}
    work = Path(tempfile.mkdtemp(prefix="bench-single-file-", dir=args.cache))
    s = result["stages"]
    runs = {
        "single_file_download": lambda: stage("download", None, {"source": single_source}, {}, work / "single_file_download", work),
        "folder_download": lambda: stage("download", None, {"source": folder_source}, {}, work / "folder_download", work),
        "folder_trace_unet": lambda: stage(
            "trace", "unet", trace_fields, {"download": work / "folder_download"}, work / "folder_trace_unet", work
        ),
        "single_file_trace_unet": lambda: stage(
            "trace", "unet", trace_fields, {"download": work / "single_file_download"}, work / "single_file_trace_unet", work
        ),
    }
    needs = {"folder_trace_unet": "folder_download", "single_file_trace_unet": "single_file_download"}
    wanted = [name for name in runs if name in args.stages or any(needs.get(w) == name for w in args.stages)]
    try:
        for name in wanted:
            s[name] = runs[name]()
            if name.endswith("trace_unet"):
                shutil.rmtree(work / name)  # GBs of TorchScript
            if name == "single_file_download":
                converted = work / name / "model"
                result["converted_folder_bytes"] = sum(f.stat().st_size for f in converted.rglob("*") if f.is_file())
                # Not measured: shows the converted folder is the same bytes before and after a change.
                result["converted_sha256"] = {
                    f.relative_to(converted).as_posix(): sha256_file(f) for f in sorted(converted.rglob("*")) if f.is_file()
                }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    if "single_file_download" in s and "folder_trace_unet" in s:
        folder_peak = max(s["folder_download"]["peak_rss_gib"], s["folder_trace_unet"]["peak_rss_gib"])
        result["single_file_peak_over_folder_path_peak"] = round(s["single_file_download"]["peak_rss_gib"] / folder_peak, 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny SDXL (tests/models/single_file.py) to try the code path")
    parser.add_argument("--cache", type=Path, default=Path("/work/bench-cache"))
    parser.add_argument("--stages", default="single_file_download,folder_download,folder_trace_unet,single_file_trace_unet",
                        help="which to measure (a trace brings its download along)")
    parser.add_argument("--result", default="single-file-sdxl.json", help="file name under bench/results/")
    parser.add_argument("--make", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.cache = args.cache.resolve()
    args.cache.mkdir(parents=True, exist_ok=True)
    args.stages = args.stages.split(",")
    if args.make:
        make_models(args.cache, args.tiny)
        return
    # Made in a process of its own, so its memory is gone before anything is measured.
    cmd = [sys.executable, __file__, "--make", "--cache", str(args.cache)] + (["--tiny"] if args.tiny else [])
    subprocess.run(cmd, check=True)
    result = measure(args)
    print(json.dumps(result, indent=2))
    if not args.tiny:
        RESULTS.mkdir(parents=True, exist_ok=True)
        result["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        (RESULTS / args.result).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
