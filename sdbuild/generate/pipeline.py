"""The pipeline: one bundle's models around diffusers' schedulers, as Apple's pipelines run them.

``Pipeline.from_bundle`` finds (``discovery``) and loads (``runners``) the
models once; ``Pipeline.generate`` runs the guidance loop, with ControlNet
residuals when ControlNets are asked for.
"""

from __future__ import annotations

import functools
import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from sdbuild.bundle_names import PIPELINE_FILE
from sdbuild.generate.discovery import (
    BundleFiles,
    _checkpoint_of,
    _find_file,
    _require_controlled_unet,
    _require_encoder,
    find_bundle,
    find_controlnet,
    load_tokenizer,
    pick_size,
)
from sdbuild.generate.errors import GenerationError
from sdbuild.generate.images import _clip_pixels, _resize
from sdbuild.generate.request import REFINER_START, RNG_MODES, check_controlnets, check_settings  # noqa: F401
from sdbuild.generate.runners import ChainedRunner, CoreMLRunner, ExecutorRunner, ModelRunner, default_backend
from sdbuild.generate.schedulers import make_scheduler, scheduler_name
from sdbuild.families import FAMILIES, INPAINT_CHANNELS, Family
from sdbuild.recipe import COMPUTE_UNITS
from sdbuild.stages.trace import RESOLUTION_KINDS

# Apple's Swift package defaults (StableDiffusionPipeline.Configuration): the refiner is conditioned
# on aesthetic scores 6 (prompt) and 2.5 (negative prompt), as diffusers' too.
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5
REFINER_TIME_IDS = 5
SCHEDULER_CONFIG = "scheduler_config.json"


def _check_inpainting(pipe, image, mask) -> None:
    """An inpainting bundle needs --image and --mask; a mask needs an inpainting bundle and the image's size."""
    if mask is not None and not pipe.inpainting:
        raise GenerationError(f"--mask: {pipe.bundle.describe('unet')} is not an inpainting unet (it takes 4 channels, not 9); drop --mask")
    if pipe.inpainting and (image is None or mask is None):
        raise GenerationError(f"{pipe.bundle.describe('unet')} is an inpainting unet: give --image and --mask (white where to repaint)")
    if mask is not None and mask.shape[:2] != image.shape[:2]:
        raise GenerationError(f"--mask is {mask.shape[1]}x{mask.shape[0]} pixels; --image is {image.shape[1]}x{image.shape[0]}: give them one size")


@dataclass
class Generation:
    """One call's results: ``images`` float32 [N, 8H, 8W, 3] in [0, 1] (flagged ones black),
    ``nsfw`` per image, ``latents`` [N, 4, H, W] after the last step, and what was used."""

    images: np.ndarray
    nsfw: list[bool]
    latents: np.ndarray
    settings: dict
    notes: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)


class Pipeline:
    """Stable Diffusion over a bundle's models; build once with ``from_bundle``, call ``generate`` many times."""

    def __init__(self, bundle: BundleFiles, runners: dict[str, ModelRunner], tokenizer, scheduler_config: dict,
                 scaling_factor: float, backend: str, compute_unit: str | None, notes: list[str], load_seconds: float,
                 make: Callable[[str, list[Path]], ModelRunner] | None = None):
        self.bundle = bundle
        self.runners = runners
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.scaling_factor = scaling_factor
        self.backend = backend
        self.compute_unit = compute_unit
        self.notes = notes  # facts about the bundle, repeated with every generation
        self.load_seconds = load_seconds
        # What loads a model asked for later (controlled unet, ControlNets): as the others were loaded.
        self._make = make or (lambda component, paths: ExecutorRunner(paths))
        unet = runners["unet"]
        shape = unet.inputs["sample"][0]
        self.unet_batch = int(shape[0])  # 2: both guidance halves in one call; 1: a unet_batch_one bundle
        self.latent_shape = tuple(int(s) for s in shape[1:])  # (4, H, W)
        # An inpainting unet takes latents, the mask and the masked image's latents: 4 + 1 + 4 channels.
        self.inpainting = self.latent_shape[0] == INPAINT_CHANNELS
        if self.inpainting:
            self.latent_shape = ((INPAINT_CHANNELS - 1) // 2, *self.latent_shape[1:])
        # Image pixels per latent pixel: the bundle's VAE says (pipeline.json); the family's, else.
        factor = int(bundle.facts.get("vae_scale_factor") or self.spec.vae_scale_factor)
        self.image_size = (factor * self.latent_shape[1], factor * self.latent_shape[2])  # (height, width) in pixels
        encoder = runners.get("text_encoder") or runners["text_encoder_2"]
        self.sequence_length = int(encoder.inputs["input_ids"][0][-1])
        # As Apple's Swift package tells them apart: a refiner's unet takes 5 time_ids (the base's 6).
        self.refiner_only = self.spec.text_time and _time_id_count(unet) == REFINER_TIME_IDS
        refiner = runners.get("unet_refiner")
        if refiner is not None and _time_id_count(refiner) != REFINER_TIME_IDS:
            raise GenerationError(f"{bundle.describe('unet_refiner')}: takes {_time_id_count(refiner)} time_ids; an SDXL refiner takes {REFINER_TIME_IDS}")

    @property
    def family(self) -> str:
        return self.bundle.family

    @property
    def spec(self) -> Family:
        """The family's table entry (``sdbuild.families``)."""
        return FAMILIES[self.family]

    @property
    def has_refiner(self) -> bool:
        """Whether the bundle carries a refiner beside the base unet (``UnetRefiner``)."""
        return "unet_refiner" in self.runners

    @classmethod
    def from_bundle(cls, path: Path, compute_unit: str | None = None, backend: str | None = None,
                    height: int | None = None, width: int | None = None, decompress_at_load: bool = False) -> "Pipeline":
        """Find and load the bundle at ``path``: every model, the tokenizer, the scheduler config.

        ``backend``: ``coreml`` (macOS) or ``executor``; default by platform.
        ``compute_unit``: a Core ML compute unit; default the bundle's hint, else ALL.
        ``height``, ``width``: the image size, one the bundle was built for
        (``pick_size``); default its first. A multifunction bundle's image
        models then run that size's function. ``decompress_at_load`` (the
        reference executor): a compressed model's weights are decompressed
        once and kept, not at every run (the unet runs at every step): memory
        for time; the build's sample image keeps to the default, bounded memory.
        """
        started = time.perf_counter()
        backend = backend or default_backend()
        if compute_unit is not None and compute_unit not in COMPUTE_UNITS:
            raise GenerationError(f"--compute-unit: unknown compute unit '{compute_unit}'; choose one of {', '.join(COMPUTE_UNITS)}")
        bundle = find_bundle(path, compiled_ok=backend == "coreml")
        size = pick_size(bundle, height, width)
        function = size.get("function") if size else None
        notes: list[str] = []
        if backend == "coreml":
            hint = bundle.facts.get("compute_unit") or (bundle.build or {}).get("recipe", {}).get("compute_unit")
            compute_unit = compute_unit or (hint if hint in COMPUTE_UNITS else "ALL")

            def make(paths, function=None):
                parts = [CoreMLRunner(p, compute_unit, function) for p in paths]
                return parts[0] if len(parts) == 1 else ChainedRunner(parts)
        else:
            if compute_unit is not None:
                notes.append(f"--compute-unit {compute_unit} ignored: Core ML needs macOS; the reference executor runs on the CPU")
            compute_unit = None
            make = functools.partial(ExecutorRunner, decompress_at_load=decompress_at_load)

        def make_sized(component: str, paths: list[Path]) -> ModelRunner:
            # The image models run the chosen size's function; the text encoder has one.
            return make(paths, function) if component.split("/")[0] in RESOLUTION_KINDS else make(paths)
        checkpoint = _checkpoint_of(bundle)
        tokenizer = load_tokenizer(bundle, checkpoint)
        scheduler_config = bundle.facts.get("scheduler")
        if not scheduler_config:
            found = _find_file(bundle, checkpoint, (SCHEDULER_CONFIG,), f"scheduler/{SCHEDULER_CONFIG}")
            scheduler_config = json.loads(found.read_text()) if found else None
        family = FAMILIES[bundle.family]
        if not scheduler_config:
            scheduler_config = dict(family.scheduler)
            notes.append(f"no {PIPELINE_FILE} or {SCHEDULER_CONFIG} with the bundle: using {family.scheduler_source}'s scheduler settings")
        scaling = bundle.facts.get("vae_scaling_factor")
        if scaling is None:
            found = _find_file(bundle, checkpoint, (), "vae/config.json")
            scaling = json.loads(found.read_text()).get("scaling_factor") if found else None
        scaling = float(scaling or family.scaling_factor)
        # The controlled unet and the ControlNets load when a generation first asks for them.
        runners = {component: make_sized(component, paths) for component, paths in bundle.models.items() if component != "controlled_unet"}
        pipe = cls(bundle, runners, tokenizer, scheduler_config, scaling, backend, compute_unit, notes,
                   time.perf_counter() - started, make_sized)
        if size and bundle.facts.get("multires") == "enumerated":
            # One package takes every enumerated shape: the size asked for, not the default one.
            factor = pipe.image_size[0] // pipe.latent_shape[1]
            pipe.latent_shape = (pipe.latent_shape[0], size["height"] // factor, size["width"] // factor)
            pipe.image_size = (size["height"], size["width"])
        return pipe

    @classmethod
    def from_packages(cls, packages: dict[str, Path], checkpoint: Path) -> "Pipeline":
        """A pipeline on the reference executor over loose SD packages that are no bundle (yet):
        ``packages`` maps components (``text_encoder``, ``unet``; ``vae_decoder`` to decode) to
        ``.mlpackage`` paths; tokenizer and scheduler come from the diffusers folder ``checkpoint``.
        The calibration of int8 activations runs a build's float16 packages so."""
        started = time.perf_counter()
        folder = Path(checkpoint)
        bundle = BundleFiles(folder, folder, "python", folder.name, {c: [Path(p)] for c, p in packages.items()})
        tokenizer = load_tokenizer(bundle, folder)
        scheduler_config = json.loads((folder / "scheduler" / SCHEDULER_CONFIG).read_text())
        vae_config = folder / "vae" / "config.json"
        scaling = json.loads(vae_config.read_text()).get("scaling_factor") if vae_config.is_file() else None
        runners = {component: ExecutorRunner([Path(p)]) for component, p in packages.items()}
        return cls(bundle, runners, tokenizer, scheduler_config, float(scaling or FAMILIES["sd"].scaling_factor),
                   "executor", None, [], time.perf_counter() - started)

    def _runner(self, key: str, paths: list[Path]) -> ModelRunner:
        """A model loaded on first use and kept (``controlled_unet``, ``controlnet/<file>``)."""
        if key not in self.runners:
            self.runners[key] = self._make(key, paths)
        return self.runners[key]

    def controlnet_runners(self, names: list[str]) -> tuple[ModelRunner, list[ModelRunner]]:
        """(the controlled unet, one runner per ControlNet ``names``), loaded once."""
        _require_controlled_unet(self.bundle)
        paths = [find_controlnet(self.bundle, n) for n in names]
        unet = self._runner("controlled_unet", self.bundle.models["controlled_unet"])
        return unet, [self._runner(f"controlnet/{p.name}", [p]) for p in paths]

    # ---- text

    def tokenize(self, text: str) -> tuple[np.ndarray, bool]:
        """Token ids [1, S] as float32 (the contract's input type), and whether the text was cut."""
        ids = self.tokenizer(text, padding="max_length", max_length=self.sequence_length, truncation=True).input_ids
        full = self.tokenizer(text, truncation=False).input_ids
        return np.asarray([ids], dtype=np.float32), len(full) > self.sequence_length

    def encode_text(self, text: str, refiner: bool = False) -> tuple[np.ndarray, np.ndarray | None, bool]:
        """(hidden states [1, S, C], pooled [1, C'] or None, truncated).

        SD: the text encoder's last hidden state. SDXL: both encoders'
        penultimate hidden states concatenated along C, and text_encoder_2's
        projected pooled output. ``refiner``: text_encoder_2's alone (what the
        SDXL refiner takes, from the base's second encoder as in Apple's Swift package).
        """
        ids, truncated = self.tokenize(text)
        family = FAMILIES[self.spec.refiner or self.family] if refiner else self.spec
        outs = [self.runners[encoder].run({"input_ids": ids}) for encoder in family.text_encoders]
        hidden = [out[family.text_output] for out in outs]
        hidden = hidden[0] if len(hidden) == 1 else np.concatenate(hidden, axis=-1)
        # The pooled output conditions a text_time unet: the last encoder's (text_encoder_2, projected).
        return hidden, outs[-1]["pooled_outputs"] if family.text_time else None, truncated

    # ---- generation

    def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        seed: int = 93,
        steps: int = 50,
        guidance_scale: float = 7.5,
        scheduler: str = "DDIM",
        rng: str = "numpy",
        image_count: int = 1,
        image: np.ndarray | None = None,
        strength: float = 0.75,
        progress: bool = False,
        controlnet: list[str] | None = None,
        controlnet_images: list[np.ndarray] | None = None,
        controlnet_scale: float | list[float] = 1.0,
        mask: np.ndarray | None = None,
        refiner_start: float = REFINER_START,
        aesthetic_score: float = AESTHETIC_SCORE,
        negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE,
        decode: bool = True,
    ) -> Generation:
        """Generate ``image_count`` images.

        ``mask``: with ``image``, inpainting (an inpainting bundle): float32
        [8H, 8W] in [0, 1], white (>= 0.5) where the image is repainted; run as
        diffusers' StableDiffusionInpaintPipeline runs a 9-channel unet.

        With a refiner in the bundle (``UnetRefiner``), the base unet runs the
        first ``int(steps run × refiner_start)`` steps and the refiner the rest,
        in one scheduler loop, as Apple's Swift package does (diffusers:
        ``denoising_end`` on the base, ``denoising_start`` on the refiner, the
        same fraction); 1 runs the base alone. The refiner is conditioned on
        text_encoder_2 alone and on ``aesthetic_score`` (``negative_aesthetic_score``
        for the negative prompt's row). A bundle whose unet is itself a refiner
        runs it throughout (image to image, as refiners are used).

        ``decode``: False stops at the latents (diffusers' ``output_type="latent"``):
        ``images`` is then empty [N, 0, 0, 3], and neither the VAE nor the safety checker runs.

        ``image``: a start image for image-to-image, float32 [8H, 8W, 3] in
        [0, 1]; ``strength`` in (0, 1] says how much of the schedule runs over it.
        ``rng``: ``numpy`` draws the initial latents as Apple's pipelines do
        (``RandomState(seed).randn``); ``torch`` as diffusers does (a CPU
        generator seeded with ``seed``, also used for ancestral noise).
        ``controlnet``: ControlNet ids (as in the recipe), with one control image
        each in ``controlnet_images`` (float32 [8H, 8W, 3] in [0, 1]); their
        residuals, times ``controlnet_scale`` (one number, or one per ControlNet),
        are summed and fed to the bundle's controlled unet, as diffusers'
        StableDiffusionControlNetPipeline (and MultiControlNetModel) do.
        """
        import torch

        check_settings(seed=seed, steps=steps, guidance_scale=guidance_scale, image_count=image_count, strength=strength,
                       rng=rng, refiner_start=refiner_start, scheduler=scheduler)
        name = scheduler_name(scheduler)
        if image is not None:
            _require_encoder(self.bundle)
        _check_inpainting(self, image, mask)
        if image is not None and image.shape[:2] != self.image_size:
            h, w = self.image_size
            raise GenerationError(f"--image is {image.shape[1]}x{image.shape[0]} pixels; this bundle makes {w}x{h} images")
        control = self._control(controlnet or [], controlnet_images or [], controlnet_scale)
        if control is not None and self.has_refiner and refiner_start < 1:
            raise GenerationError("--controlnet with a refiner: the refiner takes no ControlNet residuals; set --refiner-start 1")
        timings = {"unet_s": 0.0}
        notes = list(self.notes)
        started = time.perf_counter()

        t0 = time.perf_counter()
        scores = (aesthetic_score, negative_aesthetic_score)
        conditioning, truncated = self._conditioning(prompt, negative_prompt, guidance_scale, self.refiner_only, scores)
        refined = None  # the refiner's conditioning, when it takes over
        if self.has_refiner and refiner_start < 1:
            refined, _ = self._conditioning(prompt, negative_prompt, guidance_scale, True, scores)
        timings["text_encoder_s"] = time.perf_counter() - t0
        if truncated:
            notes.append(f"the prompt is longer than {self.sequence_length} tokens; the rest was cut")

        sched = make_scheduler(name, self.scheduler_config)
        sched.set_timesteps(steps)
        noise = NoiseSource(seed, rng)
        shape = (image_count, *self.latent_shape)
        if image is None:
            timesteps = sched.timesteps
            latents = noise.draw(shape) * sched.init_noise_sigma
        else:
            t0 = time.perf_counter()
            if mask is not None and strength >= 1:  # diffusers: pure noise at full strength, the image only masked
                timesteps, latents = sched.timesteps, noise.draw(shape) * sched.init_noise_sigma
            else:
                timesteps, latents = self._image_latents(sched, image, strength, steps, noise.draw, image_count)
            if mask is not None:
                inpaint = self._mask_latents(image, mask, noise.draw, image_count)
            timings["vae_encoder_s"] = time.perf_counter() - t0
        # Ancestral schedulers draw noise every step; diffusers passes its generator on.
        step_kwargs = {"generator": noise.generator} if "generator" in inspect.signature(sched.step).parameters else {}

        # Apple's Swift package: the refiner takes over at this step of those that run.
        switch = int(len(timesteps) * refiner_start) if refined is not None else len(timesteps)
        bar = _progress_bar(len(timesteps)) if progress else None
        t0 = time.perf_counter()
        try:
            for step, t in enumerate(timesteps):
                model_input = sched.scale_model_input(latents, t)
                if mask is not None:
                    model_input = torch.cat([model_input, *inpaint], dim=1)
                t1 = time.perf_counter()
                if step < switch:
                    noise_pred = self._predict_noise(model_input.numpy(), float(t), conditioning, guidance_scale, control)
                else:
                    noise_pred = self._predict_noise(model_input.numpy(), float(t), refined, guidance_scale, unet="unet_refiner")
                timings["unet_s"] += time.perf_counter() - t1
                latents = sched.step(torch.from_numpy(noise_pred), t, latents, **step_kwargs).prev_sample
                if bar:
                    bar[0].advance(bar[1])
        finally:
            if bar:
                bar[0].stop()
        timings["denoise_s"] = time.perf_counter() - t0
        timings["per_step_s"] = timings["denoise_s"] / max(len(timesteps), 1)

        t0 = time.perf_counter()
        latents = latents.numpy().astype(np.float32)
        if decode:
            images = np.stack([self.decode(latents[i : i + 1])[0] for i in range(image_count)])
            timings["vae_decoder_s"] = time.perf_counter() - t0
        else:
            images = np.zeros((image_count, 0, 0, 3), np.float32)
        nsfw = [False] * image_count
        if decode and "safety_checker" in self.runners:
            t0 = time.perf_counter()
            nsfw = [self.is_nsfw(img) for img in images]
            timings["safety_checker_s"] = time.perf_counter() - t0
            for i, flagged in enumerate(nsfw):
                if flagged:
                    images[i] = 0.0
                    notes.append(f"the safety checker flagged image {i + 1} of {image_count}; it was blacked out")
        timings["generate_s"] = time.perf_counter() - started
        settings = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "seed": seed,
            "steps": steps,
            "scheduler": name,
            "guidance_scale": guidance_scale,
            "rng": rng,
            "bundle": self.bundle.name,
        }
        if image is not None:
            settings["strength"] = strength
        if refined is not None or self.refiner_only:
            settings["aesthetic_score"] = aesthetic_score
            settings["negative_aesthetic_score"] = negative_aesthetic_score
        if refined is not None:
            settings["refiner_start"] = refiner_start
            settings["refiner_steps"] = len(timesteps) - switch
        if control is not None:
            settings["controlnet"] = ", ".join(controlnet)
            settings["controlnet_scale"] = ", ".join(f"{s:g}" for s in control[2])
        return Generation(images, nsfw, latents, settings, notes, {k: round(v, 4) for k, v in timings.items()})

    def initial_latents(self, seed: int, rng: str, count: int, scheduler: str) -> np.ndarray:
        """The text-to-image starting latents [count, 4, H, W] that ``generate`` uses for these settings."""
        sched = make_scheduler(scheduler, self.scheduler_config)
        sched.set_timesteps(1)
        return (NoiseSource(seed, rng).draw((count, *self.latent_shape)) * sched.init_noise_sigma).numpy()

    def _conditioning(
        self, prompt: str, negative_prompt: str, guidance_scale: float, refiner: bool = False,
        scores: tuple[float, float] = (AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE),
    ) -> tuple[dict, bool]:
        """Unet inputs other than sample and timestep, batch 2 (negative row first) under guidance, else 1.

        ``refiner``: the SDXL refiner's (text_encoder_2 alone; time_ids end with the
        aesthetic score, ``scores`` = (positive, negative), in place of the target size).
        """
        hidden, pooled, truncated = self.encode_text(prompt, refiner)
        rows = [(hidden, pooled)]
        if guidance_scale > 1:  # diffusers' do_classifier_free_guidance
            neg_hidden, neg_pooled, neg_cut = self.encode_text(negative_prompt, refiner)
            rows.insert(0, (neg_hidden, neg_pooled))
            truncated = truncated or neg_cut
        # (1, S, C) → (1, C, 1, S): the Neural Engine-friendly layout of the contract.
        cond = {"encoder_hidden_states": np.concatenate([h.transpose(0, 2, 1)[:, :, None, :] for h, _ in rows])}
        if self.spec.text_time:
            h, w = self.image_size
            # CONTRACT: (original h, w, crop top, left, target h, w); no crop, original = target.
            time_ids = np.asarray([[h, w, 0, 0, h, w]], dtype=np.float32)
            cond["text_embeds"] = np.concatenate([p for _, p in rows])
            cond["time_ids"] = np.repeat(time_ids, len(rows), axis=0)
            if refiner:  # (original h, w, crop top, left, aesthetic score): the negative row takes the negative score
                ids = [[h, w, 0, 0, scores[0]]] + ([[h, w, 0, 0, scores[1]]] if len(rows) == 2 else [])
                cond["time_ids"] = np.asarray(ids[::-1], dtype=np.float32)
        return cond, truncated

    def _control(self, names: list[str], images: list[np.ndarray], scale) -> tuple | None:
        """(controlled unet, ControlNet runners, scales, control images [1, 3, 8H, 8W]) or None; checks first."""
        if not names and not images:
            return None
        scales = check_controlnets(names, len(images), scale)
        h, w = self.image_size
        for name, img in zip(names, images):
            if img.ndim != 3 or img.shape[:2] != (h, w):
                got = f"{img.shape[1]}x{img.shape[0]} pixels" if img.ndim == 3 else f"of shape {img.shape}"
                raise GenerationError(f"--controlnet-inputs: the image for {name} is {got}; this bundle makes {w}x{h} images")
        unet, runners = self.controlnet_runners(names)
        conds = [np.asarray(img, np.float32).transpose(2, 0, 1)[None] for img in images]
        return unet, runners, scales, conds

    def _residuals(self, feeds: dict, control: tuple) -> dict[str, np.ndarray]:
        """The ControlNets' residuals for batch ``feeds``, each summed over the ControlNets at its scale."""
        unet, runners, scales, conds = control
        batch = feeds["sample"].shape[0]
        residuals: dict[str, np.ndarray] = {}
        for runner, scale, cond in zip(runners, scales, conds):
            out = runner.run(dict(feeds, controlnet_cond=np.repeat(cond, batch, axis=0)))
            for key, value in out.items():
                if key.startswith("additional_residual_"):
                    residuals[key] = residuals.get(key, 0.0) + scale * value.astype(np.float32)
        missing = [n for n in unet.inputs if n.startswith("additional_residual_") and n not in residuals]
        if missing:
            raise GenerationError(f"{unet.name}: takes {', '.join(missing)}, which the ControlNets do not give; rebuild the bundle")
        return residuals

    def _predict_noise(
        self, sample: np.ndarray, t: float, cond: dict, guidance_scale: float, control: tuple | None = None, unet: str = "unet"
    ) -> np.ndarray:
        """Guided noise prediction [N, 4, H, W] for latents ``sample`` [N, 4, H, W] at timestep ``t``.

        With ``control`` (from ``_control``), the ControlNets run on each batch
        the unet runs on and their summed residuals are inputs of it (the
        controlled unet's). ``unet``: the runner to use (``unet_refiner`` for
        the refiner's steps).
        """
        runner = self.runners[unet] if control is None else control[0]

        def predict(feeds: dict) -> np.ndarray:
            if control is not None:
                feeds = dict(feeds, **self._residuals(feeds, control))
            return runner.run(feeds)["noise_pred"]

        batch = int(runner.inputs["sample"][0][0])
        guided = cond["encoder_hidden_states"].shape[0] == 2
        out = []
        for x in sample:
            x = x[None]
            if guided:
                feeds = dict(cond, sample=np.concatenate([x, x]), timestep=np.full((2,), t, np.float32))
                if batch == 2:
                    uncond, text = np.split(predict(feeds), 2)
                else:  # a batch-one unet: one call per half
                    uncond, text = (predict({k: v[i : i + 1] for k, v in feeds.items()}) for i in (0, 1))
                out.append(uncond + guidance_scale * (text - uncond))
            else:
                # No guidance: a batch-two unet still needs two rows; the first is the answer.
                feeds = {k: np.repeat(v, batch, axis=0) for k, v in dict(cond, sample=x).items()}
                feeds["timestep"] = np.full((batch,), t, np.float32)
                out.append(predict(feeds)[:1])
        return np.concatenate(out).astype(np.float32)

    def _image_latents(self, sched, image: np.ndarray, strength: float, steps: int, draw, count: int):
        """(timesteps left to run, noised latents [N, 4, H, W]) for image-to-image, as diffusers' img2img."""
        import torch

        init = min(int(steps * strength), steps)
        start = max(steps - init, 0)
        timesteps = sched.timesteps[start * sched.order :]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start * sched.order)
        if len(timesteps) == 0:
            raise GenerationError(f"--strength {strength:g} with {steps} steps leaves no step to run; raise either")
        moments = self.encode_image(image)
        mean, logvar = np.split(moments, 2, axis=1)
        # diffusers' DiagonalGaussianDistribution: clamped log-variance, one draw per latent.
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        sample = torch.from_numpy(mean) + torch.from_numpy(std) * draw(mean.shape)
        init_latents = (self.scaling_factor * sample).repeat(count, 1, 1, 1)
        noise = draw(init_latents.shape)
        return timesteps, sched.add_noise(init_latents, noise, timesteps[:1].repeat(count))

    def _mask_latents(self, image: np.ndarray, mask: np.ndarray, draw, count: int):
        """(mask [N, 1, H, W], masked-image latents [N, 4, H, W]) as diffusers' inpainting pipeline makes them:
        the mask binarized at 0.5, the image zeroed under it and encoded (one draw), the mask downsampled (nearest)."""
        import torch

        binary = torch.from_numpy((mask >= 0.5).astype(np.float32))[None, None]
        # Zero in the [-1, 1] space the VAE takes, as diffusers zeroes its normalized image under the mask.
        masked = np.where(binary[0, 0, :, :, None].numpy() >= 0.5, 0.5, image).astype(np.float32)
        moments = self.encode_image(masked)
        mean, logvar = np.split(moments, 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        latents = self.scaling_factor * (torch.from_numpy(mean) + torch.from_numpy(std) * draw(mean.shape))
        small = torch.nn.functional.interpolate(binary, size=tuple(self.latent_shape[1:]))
        return small.repeat(count, 1, 1, 1), latents.repeat(count, 1, 1, 1)

    def encode_image(self, image: np.ndarray) -> np.ndarray:
        """Image [8H, 8W, 3] in [0, 1] → the VAE encoder's latent [1, 8, H, W]: mean, then log-variance (unscaled)."""
        x = (2.0 * image.astype(np.float32) - 1.0).transpose(2, 0, 1)[None]
        return self.runners["vae_encoder"].run({"x": x})["latent"].astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents [1, 4, H, W] (scaled) → image [1, 8H, 8W, 3] in [0, 1]."""
        z = (latents / self.scaling_factor).astype(np.float32)
        image = self.runners["vae_decoder"].run({"z": z})["image"]
        return np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)

    def is_nsfw(self, image: np.ndarray) -> bool:
        """The bundle's safety checker on one image [8H, 8W, 3] in [0, 1]."""
        checker = self.runners["safety_checker"]
        feeds = {"clip_input": _clip_pixels(image), "adjustment": np.zeros((1,), np.float32)}
        if "images" in checker.inputs:
            _, height, width, _ = checker.inputs["images"][0]
            feeds["images"] = _resize(image, int(height), int(width))[None]
        flags = checker.run(feeds)["has_nsfw_concepts"]
        return bool(np.any(np.asarray(flags) > 0))


def _time_id_count(unet: ModelRunner) -> int:
    """How many ``time_ids`` an SDXL unet takes per row: 6 (base) or 5 (refiner)."""
    return int(unet.inputs["time_ids"][0][-1])


class NoiseSource:
    """Gaussian draws for one generation, in the order diffusers makes them.

    ``numpy``: NumPy's legacy ``RandomState(seed).randn``, float32, as Apple's
    Python pipeline and Swift package draw latents. ``torch``: a CPU
    ``torch.Generator`` seeded with ``seed``, as diffusers' ``randn_tensor``.
    ``generator`` is also handed to schedulers that draw noise each step
    (ancestral, DDPM): the same generator object in torch mode, as in
    diffusers, and one seeded with ``seed`` in numpy mode.
    """

    def __init__(self, seed: int, rng: str):
        import torch

        if rng not in RNG_MODES:
            raise GenerationError(f"--rng: unknown mode '{rng}'; choose numpy or torch")
        self.rng = rng
        self.generator = torch.Generator().manual_seed(seed)
        self._state = np.random.RandomState(seed) if rng == "numpy" else None

    def draw(self, shape: tuple[int, ...]):
        """A float32 tensor of standard normal draws of ``shape``."""
        import torch

        if self._state is not None:
            return torch.from_numpy(self._state.randn(*shape).astype(np.float32))
        return torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32)


def _progress_bar(total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("denoising"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True)
    task = bar.add_task("denoising", total=total)
    bar.start()
    return bar, task
