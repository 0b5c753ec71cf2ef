"""model.custom_vae: the VAE components come from another VAE folder, keyed by it, and the bundle says its scaling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import run_cli, run_cli_here, write_recipe

from sdbuild.executor import prepare, run_build
from sdbuild.metrics import psnr


@pytest.fixture(scope="module")
def custom_vae(tiny_sd_checkpoint, tmp_path_factory):
    """tiny-sd's VAE with its output convolution negated and another scaling factor: a different VAE, same shapes."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sd_checkpoint / "vae", use_safetensors=True)
    with torch.no_grad():
        vae.decoder.conv_out.weight.neg_()
        vae.decoder.conv_out.bias.neg_()
    vae.register_to_config(scaling_factor=0.5)
    folder = tmp_path_factory.mktemp("vae") / "my-vae"
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


def _recipe(folder, checkpoint, vae=None):
    vae_line = f"\n  custom_vae: {vae}" if vae else ""
    return write_recipe(
        folder,
        "custom-vae" if vae else "own-vae",
        f"""name: {"custom-vae" if vae else "own-vae"}
model:
  version: {checkpoint}{vae_line}
components: [vae_decoder]
resolution: {{height: 64, width: 64}}
""",
    )


def test_vae_decoder_converts_the_custom_vae(tiny_sd_checkpoint, custom_vae, tmp_path):
    from diffusers import AutoencoderKL

    from sdbuild.mil.executor import load_program

    artifacts = tmp_path / "artifacts"
    with_custom = prepare(_recipe(tmp_path, tiny_sd_checkpoint, custom_vae), artifacts)
    own = prepare(_recipe(tmp_path, tiny_sd_checkpoint), artifacts)
    download_key = {n.stage.name: n.key for n in with_custom.nodes if n.component in (None, "vae_decoder")}
    own_key = {n.stage.name: n.key for n in own.nodes if n.component in (None, "vae_decoder")}
    assert download_key["download"] != own_key["download"]
    assert download_key["trace"] != own_key["trace"]

    run_build(with_custom, until="convert")
    convert = next(n for n in with_custom.nodes if n.stage.name == "convert")
    package = with_custom.cache.entry_path("convert", convert.key) / "model.mlpackage"
    z = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    got = load_program(package).run({"z": z}, precision="fp16")["image"]
    with torch.no_grad():
        theirs = AutoencoderKL.from_pretrained(custom_vae).decode(torch.from_numpy(z)).sample.numpy()
        original = AutoencoderKL.from_pretrained(tiny_sd_checkpoint / "vae").decode(torch.from_numpy(z)).sample.numpy()
    assert psnr(theirs, got) >= 40
    assert psnr(original, got) < 20  # not the checkpoint's own VAE


def test_bundle_records_the_custom_vae_scaling(tiny_sd_checkpoint, custom_vae, tmp_path):
    recipe = _recipe(tmp_path, tiny_sd_checkpoint, custom_vae)
    proc = run_cli_here("run", recipe, "--artifacts", tmp_path / "artifacts")
    assert proc.returncode == 0, proc.stderr[-2000:]
    facts = json.loads((tmp_path / "artifacts" / "builds" / "custom-vae" / "pipeline.json").read_text())
    assert facts["vae_scaling_factor"] == 0.5  # tiny-sd's own is 0.18215


def test_missing_custom_vae_is_one_line(tiny_sd_checkpoint, tmp_path):
    recipe = _recipe(tmp_path, tiny_sd_checkpoint, tmp_path / "no-such-vae")
    proc = run_cli("run", recipe, "--artifacts", tmp_path / "artifacts")
    assert proc.returncode == 2  # the user's input, as for a missing model.version folder
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {recipe}:") and "model.custom_vae: " in lines[0], proc.stderr
    assert "no-such-vae" in lines[0], proc.stderr
    assert not (tmp_path / "artifacts" / "cache").exists() or not any((tmp_path / "artifacts" / "cache").rglob("manifest.json"))
