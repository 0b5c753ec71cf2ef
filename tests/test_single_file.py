"""Single-file checkpoints: each family written in the original layout, built, and checked
against diffusers' own ``from_single_file`` through the reference executor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import assert_one_line_error, run_cli, run_cli_here, write_recipe
from models.families import unet_inputs
from models.single_file import make_single_file, write_single_file

from sdbuild.executor import prepare, run_build
from sdbuild.metrics import psnr

MIN_PSNR = 35
# case → components built and checked (each text encoder layout once, the VAE once)
CASES = {
    "sd1": ["text_encoder", "unet", "vae_decoder"],
    "sd2": ["text_encoder", "unet"],
    "sdxl": ["text_encoder_2", "unet"],
    "sdxl-refiner": ["unet"],
    "sd1-inpainting": ["unet"],
}


@pytest.fixture(scope="module")
def single_files(tmp_path_factory):
    """family case → (single file, the diffusers folder it was written from); fp16 as people share them."""
    root = tmp_path_factory.mktemp("single-files")
    out = {}
    for case in CASES:
        family = case.removesuffix("-inpainting")
        out[case] = make_single_file(family, root / f"{case}.safetensors", seed=len(out), inpainting=case.endswith("inpainting"))
    return out


def _recipe(folder, name, version, components, extra=""):
    return write_recipe(
        folder,
        name,
        f"""name: {name}
model:
  version: {version}{extra}
components: [{", ".join(components)}]
attention: ORIGINAL
resolution: {{height: 64, width: 64}}
""",
    )


def _package(build, component, stage="convert"):
    node = next(n for n in build.nodes if n.stage.name == stage and n.component == component)
    return build.cache.entry_path(stage, node.key) / "model.mlpackage"


def _reference_pipeline(family, path, folder):
    """diffusers' own single-file loading, told the true configs (the folder the file was written from)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    cls = {"sd1": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}.get(
        family, StableDiffusionXLImg2ImgPipeline
    )
    return cls.from_single_file(str(path), config=str(folder), local_files_only=True, torch_dtype=torch.float32)


def _expected(component, pipe, family, inputs):
    with torch.no_grad():
        if component == "unet":
            unet = pipe.unet
            context = torch.from_numpy(inputs["encoder_hidden_states"]).squeeze(2).transpose(1, 2)
            added = None
            if "text_embeds" in inputs:
                added = {k: torch.from_numpy(inputs[k]) for k in ("text_embeds", "time_ids")}
            sample, t = torch.from_numpy(inputs["sample"]), torch.from_numpy(inputs["timestep"])
            return {"noise_pred": unet(sample, t, context, added_cond_kwargs=added, return_dict=False)[0].numpy()}
        if component == "vae_decoder":
            return {"image": pipe.vae.decode(torch.from_numpy(inputs["z"])).sample.numpy()}
        out = getattr(pipe, component)(torch.from_numpy(inputs["input_ids"]).long(), output_hidden_states=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        if family.startswith("sdxl"):
            return {"hidden_embeds": out.hidden_states[-2].numpy(), "pooled_outputs": pooled.numpy()}
        return {"last_hidden_state": out.last_hidden_state.numpy(), "pooled_outputs": pooled.numpy()}


def _inputs(component, pipe):
    if component == "unet":
        cfg = pipe.unet.config
        text_dim = None
        if cfg.addition_embed_type == "text_time":
            text_dim = pipe.text_encoder_2.config.projection_dim
        return {k: v.numpy() for k, v in unet_inputs(pipe.unet, text_dim, batch=2, height=8, width=8).items()}
    if component == "vae_decoder":
        return {"z": np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)}
    ids = np.full((1, 77), 49407, dtype=np.float32)
    ids[0, 0] = 49406
    ids[0, 1:9] = [320, 1125, 539, 550, 18376, 6765, 320, 4558]
    return {"input_ids": ids}


@pytest.mark.parametrize("case", sorted(CASES))
def test_single_file_matches_diffusers(case, single_files, warm_artifacts, tmp_path):
    from sdbuild.mil.executor import load_program

    family = case.removesuffix("-inpainting")
    path, folder = single_files[case]
    components = CASES[case]
    build = prepare(_recipe(tmp_path, f"single-{case}", path, components), warm_artifacts)
    download = next(n for n in build.nodes if n.stage.name == "download")
    assert download.fields["source"]["family"] == family
    assert download.fields["source"]["inpainting"] == case.endswith("inpainting")
    run_build(build, until="convert")
    pipe = _reference_pipeline(family, path, folder)
    for component in components:
        inputs = _inputs(component, pipe)
        got = load_program(_package(build, component)).run(inputs, precision="fp16")
        for name, want in _expected(component, pipe, family, inputs).items():
            db = psnr(want, got[name])
            print(f"PSNR {case} {component} {name}: {db:.1f} dB")  # the figures of the closing note (pytest -s)
            assert db >= MIN_PSNR, (case, component, name, db)


def test_single_file_key_is_its_content(single_files, tmp_path):
    """The same bytes at another path: same family, same digest; other bytes: another download key."""
    path, folder = single_files["sd1"]
    copy = tmp_path / "renamed.safetensors"
    copy.write_bytes(path.read_bytes())
    a = prepare(_recipe(tmp_path, "a", path, ["unet"]), tmp_path / "artifacts")
    b = prepare(_recipe(tmp_path, "b", copy, ["unet"]), tmp_path / "artifacts")
    source = lambda build: build.nodes[0].fields["source"]  # noqa: E731
    assert source(a)["content"] == source(b)["content"]
    other = write_single_file(folder, "sd1", tmp_path / "other.safetensors", torch.float32)
    c = prepare(_recipe(tmp_path, "c", other, ["unet"]), tmp_path / "artifacts")
    assert source(c)["content"] != source(a)["content"] and c.nodes[0].key != a.nodes[0].key


def test_v_prediction_is_detected_or_set(single_files, tmp_path):
    path, folder = single_files["sd1"]
    marked = write_single_file(folder, "sd1", tmp_path / "v.safetensors", extra={"v_pred": torch.zeros(())})
    source = lambda p, extra="": prepare(_recipe(tmp_path, "v", p, ["unet"], extra), tmp_path / "a").nodes[0].fields["source"]  # noqa: E731
    assert source(path)["prediction_type"] == "epsilon"
    assert source(marked)["prediction_type"] == "v_prediction"
    assert source(single_files["sd2"][0])["prediction_type"] == "v_prediction"  # SD 2.x's default, as diffusers'
    assert source(single_files["sd2"][0], "\n  prediction_type: epsilon")["prediction_type"] == "epsilon"


def test_sd2_scheduler_says_v_prediction(single_files, warm_artifacts, tmp_path):
    from sdbuild.stages.download import checkpoint_dir

    build = prepare(_recipe(tmp_path, "single-sd2", single_files["sd2"][0], CASES["sd2"]), warm_artifacts)
    run_build(build, until="download")
    folder = checkpoint_dir(build.nodes[0].entry.path)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    assert json.loads((folder / "tokenizer" / "vocab.json").read_text())["<|endoftext|>"] == 49407


def test_foreign_files_are_one_line(tmp_path):
    from safetensors.torch import save_file

    sd3 = tmp_path / "sd3.safetensors"
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(3, 1)}, str(sd3))
    done = run_cli("plan", _recipe(tmp_path, "sd3", sd3, ["unet"]))
    assert_one_line_error(done, "sd3.safetensors", "SD3")
    assert done.returncode == 2

    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(lora))
    assert_one_line_error(run_cli("plan", _recipe(tmp_path, "lora", lora, ["unet"])), "LoRA", "model.loras")

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all")
    assert_one_line_error(run_cli("plan", _recipe(tmp_path, "junk", junk, ["unet"])), "junk.safetensors", "safetensors")

    pickled = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, pickled)
    done = run_cli_here("run", _recipe(tmp_path, "ckpt", pickled, ["unet"]), "--artifacts", tmp_path / "a")
    assert_one_line_error(done, "model.ckpt", "allow_pickle")


def test_pickled_checkpoint_with_allow_pickle(single_files, tmp_path):
    """A .ckpt (weights only, loaded with torch.load(weights_only=True)) resolves like its safetensors twin."""
    from safetensors.torch import load_file

    path, _ = single_files["sd1-inpainting"]
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(path), "global_step": 1}, ckpt)
    build = prepare(_recipe(tmp_path, "ckpt", ckpt, ["unet"], "\n  allow_pickle: true"), tmp_path / "artifacts")
    source = build.nodes[0].fields["source"]
    assert source["family"] == "sd1" and source["inpainting"]


def _diffusers_folder(path, dest, detected):
    """The folder diffusers' own loading gives for ``path``: each model from the file's tensors as they
    are (float16), loaded into its float32 model and saved; the reference for ``convert_single_file``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sdbuild.checkpoints import tensor_shapes, write_configs
    from sdbuild.families import layout_named

    write_configs(tensor_shapes(path), detected, dest)
    state = load_file(path)
    for cls, component in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
        model = cls.from_single_file(str(path), config=str(dest), subfolder=component, local_files_only=True)
        model.save_pretrained(dest / component, safe_serialization=True)
    for component, _, _ in layout_named(detected.family).text_encoders:
        cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
        model = create_diffusers_clip_model_from_ldm(cls, state, subfolder=component, config=str(dest), local_files_only=True)
        model.save_pretrained(dest / component, safe_serialization=True)


def test_converted_folder_is_byte_identical_to_diffusers_loading(single_files, tmp_path, monkeypatch):
    """Reading the tensors already in the model's dtype, the file reopened every few tensors (the
    memory-frugal path), writes the same bytes, every file, as diffusers loading the float16 file and
    saving; the weights are float32 as diffusers leaves them."""
    from safetensors import safe_open

    from sdbuild import checkpoints
    from sdbuild.checkpoints import convert_single_file, detect_family, tensor_shapes

    monkeypatch.setattr(checkpoints, "MAPPED_BYTES", 1 << 16)  # many reopenings, a tensor larger than that alone

    path, _ = single_files["sdxl"]  # both text encoder layouts, the unet and the VAE
    detected = detect_family(tensor_shapes(path), str(path))
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    convert_single_file(path, ours, detected)
    _diffusers_folder(path, theirs, detected)
    files = lambda root: {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}  # noqa: E731
    got, want = files(ours), files(theirs)
    assert sorted(got) == sorted(want)
    assert [name for name in want if got[name] != want[name]] == []
    assert sum(name.endswith(".safetensors") for name in got) == 4
    with safe_open(str(path), "pt") as f:
        assert f.get_slice(next(iter(f.keys()))).get_dtype() == "F16"
    with safe_open(str(ours / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
