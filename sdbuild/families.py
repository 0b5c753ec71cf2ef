"""The model families sdbuild converts, as data: one entry per family, everything else reads it.

An entry says what a family is made of (its default components and text
encoders), how its pipeline runs (scheduler, latent scaling, text
conditioning), how to recognise it (a diffusers folder's ``model_index.json``,
a single-file checkpoint's tensor names, a synthetic model's name) and what it
may be combined with (a refiner, ControlNets, a multilingual projection).

    family = family_of_folder(Path("stable-diffusion-xl-base-1.0"))   # FAMILIES["sdxl"]
    family.components        # ('text_encoder', 'text_encoder_2', 'unet', 'vae_decoder')

Detection goes through ``FAMILIES`` in order and takes the first entry whose
rule matches, so a more specific family comes before the one it refines (the
SDXL refiner before SDXL base, SD 1.x/2.x last as the fallback). Adding a
family is one entry here (``register_family`` for one made elsewhere) plus its
module under ``sdbuild/models/`` when its components need new code.

The names (``sd``, ``sdxl``, ``sdxl-refiner``; ``sd1``, ``sd2``… for
single-file layouts) enter stage keys and bundle metadata: never rename one.
Nothing here imports torch: planning a build reads this table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

INPAINT_CHANNELS = 9  # an inpainting unet's `sample` channels: latents 4 + mask 1 + masked-image latents 4
LATENT_CHANNELS = 4  # a text-to-image unet's


@dataclass(frozen=True)
class SingleFileLayout:
    """How one family's checkpoints look as one file (the CompVis/A1111 layout).

    ``name`` is also the folder of its diffusers configs under
    ``sdbuild/data/families/``. A file is of this layout when it has a tensor
    under every prefix of ``requires`` and none under any of ``excludes``.
    ``text_encoders``: (diffusers component, tensor prefix, ``clip`` or
    ``open_clip``). ``heads``: the unet's attention heads at every width (SD
    1.x's 8), or None for 64-wide heads. ``drops_last_text_layer``: the text
    encoder conditions on its penultimate layer, which diffusers' config
    expresses by dropping the last. ``text_time``: the unet takes SDXL's
    added time and text conditioning.
    """

    name: str
    label: str
    requires: tuple[str, ...]
    text_encoders: tuple[tuple[str, str, str], ...]
    excludes: tuple[str, ...] = ()
    prediction_type: str = "epsilon"  # when the file has no v_pred marker and the recipe says nothing
    heads: int | None = None
    drops_last_text_layer: bool = False
    text_time: bool = False

    def matches(self, has: Callable[[str], bool]) -> bool:
        """Whether a file of tensor names (``has(prefix)``: any name starts with it) is of this layout."""
        return all(has(p) for p in self.requires) and not any(has(p) for p in self.excludes)


@dataclass(frozen=True)
class Family:
    """One model family: what it is made of, how it runs, how to recognise it.

    ``components``: what a recipe converts unless it lists its own.
    ``text_encoders``: those the unet is conditioned on, in order (their
    hidden states concatenated). ``penultimate``: the text encoders give
    their penultimate layer (output ``hidden_embeds``) rather than the last
    (``last_hidden_state``). ``text_time``: the unet also takes pooled text
    embeddings and ``time_ids`` (SDXL). ``scheduler``: the published scheduler
    config, for a bundle that carries none (``scheduler_source`` says whose).
    ``scaling_factor``: latents per VAE latent when no VAE config is at hand;
    ``vae_scale_factor``: image pixels per latent pixel likewise.
    ``vae_encoder_float32``: the VAE encoder's ``x`` is float32 whatever the
    VAE's precision (Apple's converter keys it on the family).
    ``folder_rule``: whether a diffusers folder's ``model_index.json`` is of
    this family (None: any; the fallback). ``single_file``: its single-file
    layouts. ``synthetic``: names of the tiny built-in models of this family.
    ``refiner``: the family whose unet may refine this one's (``model.refiner``).
    ``w8a8``: its unet takes int8 activations (``compression.activations``;
    Apple's converter builds them for SD 1.x/2.x only).
    """

    name: str
    label: str  # in messages, with its article: "an SDXL base"
    components: tuple[str, ...]
    text_encoders: tuple[str, ...]
    scheduler: dict
    scheduler_source: str
    scaling_factor: float
    vae_scale_factor: int = 8
    penultimate: bool = False
    text_time: bool = False
    vae_encoder_float32: bool = False
    controlnet: bool = True
    multilingual: bool = True
    w8a8: bool = False
    refiner: str | None = None
    folder_rule: Callable[[dict], bool] | None = None
    single_file: tuple[SingleFileLayout, ...] = ()
    synthetic: tuple[str, ...] = ()

    @property
    def text_output(self) -> str:
        """The output of each text encoder that conditions the unet."""
        return "hidden_embeds" if self.penultimate else "last_hidden_state"

    def bundle_names(self) -> dict[str, str]:
        """Component → its model's name in a Swift bundle (``sdbuild.bundle_names``)."""
        from sdbuild.bundle_names import SWIFT_NAMES

        return {c: SWIFT_NAMES[c] for c in self.components}


# --- the families --------------------------------------------------------------

_SCALED_LINEAR = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}
# The published scheduler configs of SD 1.5 and SDXL base (keys in their files' order).
SD_SCHEDULER = {"_class_name": "PNDMScheduler", **_SCALED_LINEAR, "prediction_type": "epsilon"}
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    **_SCALED_LINEAR,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
}


def _is_sdxl(index: dict) -> bool:
    """An SDXL pipeline: a second text encoder, or an XL pipeline class."""
    return "text_encoder_2" in index or "XL" in index.get("_class_name", "")


def _is_sdxl_refiner(index: dict) -> bool:
    """An SDXL pipeline conditioned on the aesthetic score, or without a first text encoder."""
    first = index.get("text_encoder")
    return _is_sdxl(index) and (
        bool(index.get("requires_aesthetics_score")) or ("text_encoder_2" in index and (first is None or first == [None, None]))
    )


_SDXL_EMBEDDERS = (
    ("text_encoder", "conditioner.embedders.0.transformer.", "clip"),
    ("text_encoder_2", "conditioner.embedders.1.model.", "open_clip"),
)

SDXL_REFINER = Family(
    name="sdxl-refiner",
    label="an SDXL refiner",
    # A refiner alone refines images (img2img): its one text encoder, its unet as Unet, and the VAE both ways.
    components=("text_encoder_2", "unet", "vae_decoder", "vae_encoder"),
    text_encoders=("text_encoder_2",),
    scheduler=SDXL_SCHEDULER,
    scheduler_source="SDXL base",
    scaling_factor=0.13025,
    penultimate=True,
    text_time=True,
    vae_encoder_float32=True,
    controlnet=False,
    multilingual=False,
    folder_rule=_is_sdxl_refiner,
    single_file=(
        SingleFileLayout(
            "sdxl-refiner",
            "SDXL refiner",
            requires=("conditioner.embedders.0.model.",),
            excludes=("conditioner.embedders.1.",),
            text_encoders=(("text_encoder_2", "conditioner.embedders.0.model.", "open_clip"),),
            text_time=True,
        ),
    ),
    synthetic=("tiny-sdxl-refiner",),
)

SDXL = Family(
    name="sdxl",
    label="an SDXL base",
    components=("text_encoder", "text_encoder_2", "unet", "vae_decoder"),
    text_encoders=("text_encoder", "text_encoder_2"),
    scheduler=SDXL_SCHEDULER,
    scheduler_source="SDXL base",
    scaling_factor=0.13025,
    penultimate=True,  # both encoders
    text_time=True,
    vae_encoder_float32=True,
    controlnet=False,
    multilingual=False,  # Apple's SDXL pipeline takes no multilingual text encoder
    refiner="sdxl-refiner",
    folder_rule=_is_sdxl,
    single_file=(
        SingleFileLayout(
            "sdxl",
            "SDXL base",
            requires=("conditioner.embedders.1.model.", "conditioner.embedders.0.transformer."),
            text_encoders=_SDXL_EMBEDDERS,
            text_time=True,
        ),
    ),
    synthetic=("tiny-sdxl",),
)

SD = Family(
    name="sd",
    label="an SD 1.x/2.x model",
    components=("text_encoder", "unet", "vae_decoder"),
    text_encoders=("text_encoder",),
    scheduler=SD_SCHEDULER,
    scheduler_source="Stable Diffusion 1.5",
    scaling_factor=0.18215,
    w8a8=True,
    single_file=(
        # SD 2.x before 1.x: a file with both encoders' names is read as 2.x.
        SingleFileLayout(
            "sd2",
            "SD 2.x",
            requires=("cond_stage_model.model.",),
            text_encoders=(("text_encoder", "cond_stage_model.model.", "open_clip"),),
            prediction_type="v_prediction",  # SD 2.1 768, as diffusers' loader assumes
            drops_last_text_layer=True,
        ),
        SingleFileLayout(
            "sd1",
            "SD 1.x",
            requires=("cond_stage_model.transformer.",),
            text_encoders=(("text_encoder", "cond_stage_model.transformer.", "clip"),),
            heads=8,
        ),
    ),
    synthetic=("tiny-sd",),
)

# In detection order: the first whose rule matches wins; the last is the fallback.
FAMILIES: dict[str, Family] = {f.name: f for f in (SDXL_REFINER, SDXL, SD)}


def register_family(family: Family) -> None:
    """Add ``family`` to the table, checked before the others (a new family is the more specific one)."""
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    taken = {layout.name for f in FAMILIES.values() for layout in f.single_file}
    if clash := taken & {layout.name for layout in family.single_file}:
        raise ValueError(f"single-file layout {sorted(clash)[0]!r} already belongs to another family")
    entries = list(FAMILIES.values())
    FAMILIES.clear()
    FAMILIES.update((f.name, f) for f in (family, *entries))


def unregister_family(name: str) -> None:
    """Remove a family ``register_family`` added (tests)."""
    del FAMILIES[name]


# --- detection -------------------------------------------------------------------


def family(name: str) -> Family:
    """The table entry named ``name``."""
    return FAMILIES[name]


def fallback_family() -> Family:
    return next(f for f in reversed(FAMILIES.values()) if f.folder_rule is None)


def family_of_index(index: dict) -> Family:
    """The family of a diffusers pipeline from its ``model_index.json`` contents."""
    return next((f for f in FAMILIES.values() if f.folder_rule is not None and f.folder_rule(index)), fallback_family())


def read_model_index(checkpoint: Path) -> dict:
    from sdbuild.errors import RecipeError

    index = Path(checkpoint) / "model_index.json"
    if not index.is_file():
        raise RecipeError(f"{checkpoint}: no model_index.json: not a diffusers pipeline folder")
    return json.loads(index.read_text())


def family_of_folder(checkpoint: Path) -> Family:
    """The family of the diffusers pipeline folder ``checkpoint`` (RecipeError when it is not one)."""
    return family_of_index(read_model_index(checkpoint))


def single_file_layouts() -> list[SingleFileLayout]:
    """Every family's single-file layouts, in detection order."""
    return [layout for f in FAMILIES.values() for layout in f.single_file]


def single_file_layout(names: list[str]) -> SingleFileLayout | None:
    """The layout a checkpoint's tensor ``names`` show, or None."""
    has = lambda prefix: any(n.startswith(prefix) for n in names)  # noqa: E731
    return next((layout for layout in single_file_layouts() if layout.matches(has)), None)


def layout_named(name: str) -> SingleFileLayout:
    return next(layout for layout in single_file_layouts() if layout.name == name)


def family_of_layout(layout_name: str) -> Family:
    """The family a single-file layout (``sd1``, ``sdxl-refiner``…) belongs to."""
    return next(f for f in FAMILIES.values() if any(layout.name == layout_name for layout in f.single_file))


def family_of_synthetic(name: str) -> Family:
    """The family of a synthetic model (``synthetic:tiny-sdxl`` or ``tiny-sdxl``); an unlisted one is the fallback's."""
    name = name.removeprefix("synthetic:")
    return next((f for f in FAMILIES.values() if name in f.synthetic), fallback_family())


def family_of_source(source: dict) -> Family:
    """The family of a resolved checkpoint (``stages.download.resolve_source``'s answer)."""
    if source["kind"] == "synthetic":
        return family_of_synthetic(source["name"])
    if source["kind"] == "single_file":
        return family_of_layout(source["family"])
    return family_of_folder(Path(source["path"]))


def family_of_bundle(components) -> Family:
    """The family of a bundle from the models it holds: the one whose text encoders it has, exactly."""
    encoders = {c for c in components if c.startswith("text_encoder")}
    return next((f for f in FAMILIES.values() if set(f.text_encoders) == encoders), fallback_family())


def all_components() -> list[str]:
    """Every component some family converts by default, without repeats."""
    return list(dict.fromkeys(c for f in FAMILIES.values() for c in f.components))
