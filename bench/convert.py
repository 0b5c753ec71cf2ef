"""Benchmark: trace + convert (and optionally palettize, chunk) one full-size component, as the stages do it.

    .venv/bin/python bench/convert.py --model sd15 --component unet --attention SPLIT_EINSUM --json
    .venv/bin/python bench/convert.py --model sdxl --component unet --attention ORIGINAL --nbits 6 --chunk 2 --json
    .venv/bin/python bench/convert.py --model sd15 --component unet --sizes 512x512,512x768,768x512 --target macOS15
    .venv/bin/python bench/convert.py            # every target below, one process each, then a table

The checkpoint is a diffusers folder with the public configuration of the
model and random weights (seed 0; no hub is reachable), made once in its own
process and cached under ``--cache``, so making it is not measured. A
measured run calls the real stage functions (``sdbuild.stages.trace``,
``convert``, ``compress``, ``chunk``) through ``executor.run_in_child``, one
fresh child process per stage as a build runs them, and samples the RSS of
this process and all its children together: ``peak_rss_gib`` is the peak of
the whole tree. ``wall_s`` is trace + convert (process start and imports
included); palettization and chunking are timed separately.

Timings mean something only on an idle machine: the load average before and
after each run goes into its JSON (``load_before``, ``load_after``).
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
RESULTS = ROOT / "bench" / "results"

RESOLUTION = {"sd15": 512, "sd21-base": 512, "sdxl": 1024, "tiny": 64}
# A small unet with SD 1.5's layout, to try the script in seconds (``--model tiny``).
TINY_UNET = {
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "sample_size": 8,
}

# (model, component, attention, nbits, chunk): what `make bench` measures. SDXL last: it takes longest.
TARGETS = [
    ("sd15", "unet", "SPLIT_EINSUM", None, None),
    ("sd15", "unet", "ORIGINAL", None, None),
    ("sd15", "unet", "SPLIT_EINSUM", 6, None),
    ("sd15", "text_encoder", "ORIGINAL", None, None),
    ("sd15", "vae_decoder", "ORIGINAL", None, None),
    ("sdxl", "unet", "ORIGINAL", None, None),
    ("sdxl", "unet", "ORIGINAL", 6, 2),
]


def configs(model: str) -> dict:
    if model == "tiny":
        return {"unet": TINY_UNET}
    sys.path.insert(0, str(ROOT / "tests" / "models"))
    from full_size import ARCHS  # the public full-size configs, shared with the model tests

    return ARCHS[model]


def make_checkpoint(model: str, path: Path) -> None:
    """A diffusers folder: model_index.json and the model's unet, text_encoder and VAE, random weights (seed 0)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = configs(model)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index = {"_class_name": "StableDiffusionXLPipeline" if model == "sdxl" else "StableDiffusionPipeline"}
    torch.manual_seed(0)
    UNet2DConditionModel(**cfg["unet"]).save_pretrained(tmp / "unet", safe_serialization=True)
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    if "text_encoder" in cfg:
        torch.manual_seed(0)
        CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])).save_pretrained(tmp / "text_encoder", safe_serialization=True)
        index["text_encoder"] = ["transformers", "CLIPTextModel"]
    if "vae_decoder" in cfg:
        torch.manual_seed(0)
        AutoencoderKL(**cfg["vae_decoder"]).save_pretrained(tmp / "vae", safe_serialization=True)
        index["vae"] = ["diffusers", "AutoencoderKL"]
    add_tokenizer(tmp)
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    tmp.rename(path)


def add_tokenizer(folder: Path) -> None:
    """CLIP's tokenizer (shipped vocabulary), which a build's bundle copies; folders made before it lacked one."""
    from sdbuild.clip_vocab import write_clip_vocabulary

    if not (folder / "tokenizer" / "merges.txt").is_file():
        write_clip_vocabulary(folder / "tokenizer")


def checkpoint(model: str, cache: Path) -> Path:
    """The cached checkpoint folder, made in a child process the first time (not measured)."""
    path = cache / f"ckpt-{model}"
    if not (path / "model_index.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"making the {model} checkpoint (random weights) in {path} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, __file__, "--make-checkpoint", model, "--cache", str(cache)], check=True)
    add_tokenizer(path)
    return path


def package_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def measure(args, trace_run: str | None = None, keep: bool = False) -> dict:
    """Run the stages for one target in child processes; figures as JSON-ready dict. ``trace_run``: the trace
    stage's function instead of its own (``sdbuild.stages.trace:run_with_weights``: today's path before
    placeholders); ``keep``: keep the stage outputs whatever ``--keep`` says."""
    from sdbuild.executor import _TreeMemory, run_in_child
    from sdbuild.stages import STAGES, Job

    ckpt = checkpoint(args.model, args.cache)
    side = args.resolution or RESOLUTION[args.model]
    resolution = {"height": side, "width": side}
    multires = None
    if args.sizes:  # several resolutions: one multifunction package (``multires: functions``)
        resolution = [dict(zip(("height", "width"), map(int, s.split("x")))) for s in args.sizes.split(",")]
        multires = "functions" if len(resolution) > 1 else None
    fields = {
        "trace": {"attention": args.attention, "resolution": resolution, "multires": multires, "unet_batch_one": False},
        "convert": {"target": args.target, "resolution": resolution, "multires": multires},
        "compress": {"compression": {"nbits": args.nbits, "components": [args.component]}},
        "chunk": {"chunk": {"unet": args.chunk}},
        "verify": {"verify.samples": 1, "verify.seed": 0, "compute_unit": "CPU_AND_NE"},
    }
    stages = ["trace", "convert"] + (["compress"] if args.nbits else []) + (["chunk"] if args.chunk else [])
    stages += ["verify"] if args.verify else []
    result = {
        "model": args.model,
        "component": args.component,
        "attention": args.attention,
        "resolution": resolution if args.sizes else side,
        "nbits": args.nbits,
        "chunk": args.chunk,
        "target": args.target,
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "cpus": len(os.sched_getaffinity(0)),
        "stages": {},
    }
    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.cache))
    tree = _TreeMemory(os.getpid())
    tree.start()
    upstream = {"download": ckpt.parent}
    try:
        # checkpoint_dir() reads a download entry's ``source.json``: point one at the cached folder.
        download = work / "download"
        download.mkdir()
        (download / "source.json").write_text(json.dumps({"kind": "local", "path": str(ckpt)}))
        upstream = {"download": download}
        temp = work / "tmp"
        temp.mkdir()
        for name in stages:
            out = work / name
            out.mkdir()
            job = Job(name, args.component, fields[name], dict(upstream), build_name="bench")
            started = time.perf_counter()
            run = trace_run if name == "trace" and trace_run else STAGES[name].run
            # Outside a cache a stage's temporary files (coremltools' tmp*.mlpackage) go to TMPDIR: here, this run's own.
            facts = run_in_child(run, job, out, work / f"{name}.log", env={"TMPDIR": str(temp)})
            result["stages"][name] = {
                "seconds": round(time.perf_counter() - started, 1),
                "peak_rss_gib": round(facts["peak_rss_bytes"] / 2**30, 2),
                "phases_s": facts.get("phases_s"),
            }
            if "weights" in facts:
                result["stages"][name]["weights"] = facts["weights"]
            upstream[name] = out
            if name == "verify":
                result["psnr"] = {k: v for k, v in json.loads((out / "psnr.json").read_text()).items() if k.endswith("psnr_db")}
        final = upstream[[name for name in stages if name != "verify"][-1]]
        parts = sorted(final.glob("*.mlpackage"))
        result["package_bytes"] = sum(package_bytes(p) for p in parts)
        result["packages"] = {p.name: package_bytes(p) for p in parts}
        if args.sizes:
            result["weight_bytes"] = sum(f.stat().st_size for p in parts for f in p.rglob("weight.bin"))
            if args.executor_functions != 0:
                result["executor"] = executor_seconds(parts[0], args.executor_functions, args.executor_deadline)
    finally:
        peak = tree.stop()
        shutil.rmtree(work / "tmp", ignore_errors=True)
        if not (args.keep or keep):
            shutil.rmtree(work, ignore_errors=True)
        else:
            result["kept"] = str(work)
    s = result["stages"]
    result["wall_s"] = round(s["trace"]["seconds"] + s["convert"]["seconds"], 1)
    # The sampler polls; a stage's own high-water mark (ru_maxrss) can be higher than any poll saw.
    result["peak_rss_gib"] = round(max([peak / 2**30] + [stage["peak_rss_gib"] for stage in s.values()]), 2)
    if "compress" in s:
        result["palettize_s"] = s["compress"]["seconds"]
    if "chunk" in s:
        result["chunk_s"] = s["chunk"]["seconds"]
    if "verify" in s:
        result["verify_s"] = s["verify"]["seconds"]
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return result


def side_by_side(args) -> dict:
    """Today's path (trace with the weights, convert them) then the placeholder path (trace with placeholders,
    bind the weights into the saved package), one after the other on the same checkpoint; whether their
    packages are the same bytes."""
    from sdbuild.mlpackage import WEIGHT_FILE

    old = measure(args, trace_run="sdbuild.stages.trace:run_with_weights", keep=True)
    new = measure(args, keep=True)
    try:
        packages = [sorted((Path(r["kept"]) / "convert").glob("*.mlpackage")) for r in (old, new)]
        files = [{str(f.relative_to(p)): f for p in ps for f in sorted(p.rglob("*")) if f.is_file()} for ps in packages]
        equal = list(files[0]) == list(files[1]) and all(_same_file(files[0][k], files[1][k]) for k in files[0])
        weights_equal = all(_same_file(a / WEIGHT_FILE, b / WEIGHT_FILE) for a, b in zip(*packages))
    finally:
        if not args.keep:
            for r in (old, new):
                shutil.rmtree(r.pop("kept"), ignore_errors=True)
    return {"old": old, "new": new, "packages_equal": equal, "weight_bin_equal": weights_equal,
            "wall_s": {"old": old["wall_s"], "new": new["wall_s"]},
            "peak_rss_gib": {"old": old["peak_rss_gib"], "new": new["peak_rss_gib"]}}  # fmt: skip


def _same_file(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while block := fa.read(1 << 24):
            if block != fb.read(1 << 24):
                return False
    return True


def executor_seconds(package: Path, limit: int | None = None, deadline: float | None = None) -> dict:
    """The reference executor on each function of ``package`` (the first ``limit``), each in a fresh process:
    load seconds, one float16 run's seconds (inputs as the function declares them, batch included), peak RSS.
    A run still going at ``deadline`` (time.time()) is stopped and recorded as such, later ones not started."""
    from sdbuild.convert.multifunction import function_names

    out = {}
    for name in (function_names(package) or [None])[:limit]:
        left = None if deadline is None else deadline - time.time()
        if left is not None and left < 10:
            out[name or "main"] = {"not_run": "deadline"}
            continue
        cmd = [sys.executable, __file__, "--executor-run", str(package)] + (["--function", name] if name else [])
        print(f"executor: {name or 'main'} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=left)
        except subprocess.TimeoutExpired:
            out[name or "main"] = {"stopped_after_s": round(time.perf_counter() - started, 1)}
            continue
        out[name or "main"] = json.loads(proc.stdout.splitlines()[-1])
    return out


def executor_run(package: Path, function: str | None) -> dict:
    """Load one function of ``package`` into the reference executor and run it once in float16 (as verify does)."""
    import resource

    import numpy as np

    from sdbuild.mil.executor import load_program

    load_before = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    program = load_program(package, function=function)
    loaded = time.perf_counter()
    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal(shape).astype(np.float32) for k, (shape, _) in program.inputs.items()}
    program.run(feeds, precision="fp16")
    return {
        "inputs": {k: list(shape) for k, (shape, _) in program.inputs.items()},
        "load_s": round(loaded - started, 1),
        "run_s": round(time.perf_counter() - loaded, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),  # Linux: KiB
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }


def result_name(model, component, attention, nbits, chunk, sizes=None) -> str:
    name = f"convert-{model}-{component}-{attention}"
    name += f"-{len(sizes.split(','))}res" if sizes else ""
    name += f"-{nbits}bit" if nbits else ""
    name += f"-chunk{chunk}" if chunk else ""
    return name + ".json"


def run_all(args) -> None:
    rows = []
    for model, component, attention, nbits, chunk in TARGETS:
        cmd = [sys.executable, __file__, "--model", model, "--component", component, "--attention", attention,
               "--cache", str(args.cache), "--json"]  # fmt: skip
        cmd += ["--nbits", str(nbits)] if nbits else []
        cmd += ["--chunk", str(chunk)] if chunk else []
        print(" ".join(cmd[1:]), file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            rows.append((model, component, attention, nbits, chunk, None))
            continue
        result = json.loads(proc.stdout)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / result_name(model, component, attention, nbits, chunk)).write_text(json.dumps(result, indent=2) + "\n")
        rows.append((model, component, attention, nbits, chunk, result))
    print(f"{'target':<42} {'wall s':>7} {'palett. s':>9} {'peak GiB':>8} {'package MiB':>11} {'load':>5}")
    for model, component, attention, nbits, chunk, r in rows:
        label = f"{model} {component} {attention}" + (f" {nbits}-bit" if nbits else "") + (f" /{chunk}" if chunk else "")
        if r is None:
            print(f"{label:<42} failed")
            continue
        pal = f"{r['palettize_s']:.1f}" if "palettize_s" in r else "-"
        print(
            f"{label:<42} {r['wall_s']:>7.1f} {pal:>9} {r['peak_rss_gib']:>8.2f} "
            f"{r['package_bytes'] / 2**20:>11.1f} {r['load_before'][0]:>5.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["sd15", "sd21-base", "sdxl", "tiny"])
    parser.add_argument("--component", choices=["unet", "text_encoder", "vae_decoder"], default="unet")
    parser.add_argument("--attention", choices=["ORIGINAL", "SPLIT_EINSUM", "SPLIT_EINSUM_V2"], default="SPLIT_EINSUM")
    parser.add_argument("--nbits", type=int)
    parser.add_argument("--chunk", type=int)
    parser.add_argument("--resolution", type=int, help="image side in pixels (default: the model's)")
    parser.add_argument("--sizes", help="HxW[,HxW…]: several resolutions in one multifunction package (needs --target macOS15)")
    parser.add_argument("--target", default="macOS14")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/sdbuild-bench"))
    parser.add_argument("--verify", action="store_true", help="also run the verify stage (one sample) and measure it")
    parser.add_argument("--keep", action="store_true", help="keep the stage outputs (path in the JSON)")
    parser.add_argument("--side-by-side", action="store_true",
                        help="today's path (trace with the weights) then the placeholder path, same checkpoint; packages compared")
    parser.add_argument("--json", action="store_true", help="one target: print its figures as one JSON object")
    parser.add_argument("--executor-functions", type=int, help="with --sizes: run the executor on the first N functions (0: none; default all)")
    parser.add_argument("--executor-deadline", type=float, help="unix time: stop the executor runs there (the figures so far are kept)")
    parser.add_argument("--make-checkpoint", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--executor-run", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--function", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.cache = args.cache.resolve()
    if args.executor_run:
        print(json.dumps(executor_run(args.executor_run, args.function)))
        return
    if args.make_checkpoint:
        make_checkpoint(args.make_checkpoint, args.cache / f"ckpt-{args.make_checkpoint}")
        return
    if args.model is None:
        run_all(args)
        return
    if args.side_by_side:
        result = side_by_side(args)
        RESULTS.mkdir(parents=True, exist_ok=True)
        name = result_name(args.model, args.component, args.attention, args.nbits, args.chunk, args.sizes)
        path = RESULTS / name.replace("convert-", "convert-side-by-side-")
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return
    result = measure(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / result_name(args.model, args.component, args.attention, args.nbits, args.chunk, args.sizes)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
