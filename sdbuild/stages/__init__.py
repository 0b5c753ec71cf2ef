"""The stages of a build, each declared once: what it reads, what it consumes, what it is.

A stage function gets a ``Job`` holding only the recipe fields the stage
declares and its upstream entries' folders, and writes its files into ``out``.
The executor derives the graph (which nodes, and each one's upstream) and
every cache key from these declarations: adding a stage is its module plus
its ``Stage`` here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from sdbuild import __version__

T = TypeVar("T")


@dataclass(frozen=True)
class Input:
    """What a stage consumes of its component: the first of ``stages`` the component has (none: nothing).

    ``when``: consumed only where it holds for the build (``Plan``). A stage of
    the whole build consuming a per-component stage takes every component's node.
    ``component``: another component's (the calibration's text encoder); where the
    build does not ship it, its nodes up to ``stages`` are built for this one alone.
    """

    stages: tuple[str, ...]
    when: Callable[["Plan"], bool] | None = None
    component: str | None = None

    def first(self, found: Mapping[str, T]) -> T | None:
        """The value under the first of ``stages`` that ``found`` (by stage name) has."""
        return next((found[s] for s in self.stages if s in found), None)


# A component's package: compressed where it is, else as converted.
PACKAGE_OF = Input(("compress", "convert"))
# What of it ships: the chunk parts where it is chunked, else its package.
SHIPPED = Input(("chunk", *PACKAGE_OF.stages))
EVERY = Input(("*",))  # every node planned before this one


@dataclass(frozen=True)
class Stage:
    """A stage's declaration.

    fields: recipe fields (dotted) it reads, for every component (or facts of the
    build, ``Plan.facts``: the resolved source, the compiler's version, …);
    component_fields: more fields read for one component only;
    libraries: distributions whose versions enter the key;
    code: sdbuild modules whose source enters the key besides ``run``'s module; the
    executor adds every sdbuild module these import, transitively (read, not imported);
    run: ``module:function`` called as ``function(job, out) -> dict``, always in a
    child process (memory goes back when it ends, a crash loses nothing else); for a
    stage that ``publishes``, the function the executor lays the build folder out with;
    consumes: the upstream outputs it reads, stage names or ``Input``s, each where
    the component has it: they are its upstream in the graph and in its key;
    after: stages whose output it reads without consuming it (ordering only, never keyed);
    reads: stages behind its consumed ones whose outputs it opens too (verify: the download its
    trace was made from); a consumed entry's key holds theirs already, so they are handed to the
    job and never keyed again;
    scope: ``component`` (a node per component it applies to), ``source`` (one per
    checkpoint: the model's, the refiner's, each ControlNet's) or ``build`` (one,
    for ``component`` when set);
    applies: whether the build (``Plan``) has a node of it for a component;
    runners: the CI runners that run it (``sdbuild matrix``);
    publishes: its output is the build folder, laid out by the executor, not a cache entry;
    preload: the heavy modules its process uses, of ``executor.STAGE_SERVER_PRELOAD``: a build's stage
    server imports those of the stages it has to build, once, before any forks from it (never keyed).
    """

    name: str
    version: str
    run: str
    fields: tuple[str, ...] = ()
    component_fields: dict[str, tuple[str, ...]] = field(default_factory=dict)
    libraries: tuple[str, ...] = ()
    code: tuple[str, ...] = ()
    resumable: bool = False  # gets a scratch folder that survives a kill, removed once published
    consumes: tuple[str | Input, ...] = ()
    after: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    scope: str = "component"
    component: str | None = None
    applies: Callable[["Plan", str | None], bool] = lambda plan, component: True
    runners: tuple[str, ...] = ("linux",)
    publishes: bool = False
    preload: tuple[str, ...] = ()

    def fields_for(self, component: str | None) -> tuple[str, ...]:
        return self.fields + self.component_fields.get(component_kind(component), ())

    def inputs(self) -> tuple[Input, ...]:
        """``consumes`` with plain stage names as ``Input``s."""
        return tuple(Input((c,)) if isinstance(c, str) else c for c in self.consumes)


REFINER = "unet_refiner"  # the SDXL refiner's unet, built from model.refiner's own download


def component_kind(component: str | None) -> str:
    """``controlnet/lllyasviel/sd-controlnet-mlsd`` → ``controlnet``; other names are their own kind."""
    return (component or "").split("/")[0]


def weights_kind(component: str | None) -> str:
    """The component whose weights (and recipe settings) a component shares: the controlled unet
    and the refiner's unet are unets; a ControlNet is a ``controlnet``."""
    kind = component_kind(component)
    return {"controlled_unet": "unet", REFINER: "unet"}.get(kind, kind)


@dataclass
class Plan:
    """The build being planned, as a stage's ``applies`` and ``when`` see it.

    components: what the bundle holds, in order (the refiner's unet and the ControlNets last);
    sources: the components with a checkpoint of their own (refiner, ControlNets) → it;
    compressed: the kinds ``compression.components`` names (the unet only for mixed-bit);
    facts: values a stage may declare as fields besides the recipe's (``source``,
    ``coremlcompiler``, ``multires`` resolved, ``recipe``, ``family``, ``calibration`` and ``analysis`` with their defaults).
    """

    recipe: Any
    components: list[str]
    sources: dict[str, dict]
    compressed: set[str]
    mixed_bit: bool
    analysis: bool  # the unet's mixed-bit pre-analysis is built
    calibrating: bool  # W8A8: the unet's activations are calibrated (compression.activations)
    compiler: str | None  # coremlcompiler's version where it exists (macOS)
    facts: dict[str, Any] = field(default_factory=dict)

    def is_compressed(self, component: str) -> bool:
        # A checkpoint of its own (refiner, ControlNet) has no mixed-bit measurement: it stays float16.
        return weights_kind(component) in self.compressed and not (self.mixed_bit and component in self.sources)


@dataclass
class Job:
    """What a stage function may read: its declared fields and upstream folders."""

    stage: str
    component: str | None
    fields: dict[str, Any]
    upstream: dict[str, Path]
    build_name: str = ""
    scratch: Path | None = None  # kept across a killed run of this key: for resumable stages

    def input(self, consumed: Input) -> Path:
        """The folder of the first of ``consumed``'s stages upstream (``PACKAGE_OF``: the package to read)."""
        return consumed.first(self.upstream)


TORCH_LIBS = ("torch", "diffusers", "transformers", "safetensors")
COREML_LIBS = ("coremltools", "numpy")

# What stage processes import (``Stage.preload``), as a stage run in a fresh interpreter showed: the model
# code, Core ML's (coremltools imports torch and transformers itself), the pipelines a synthetic checkpoint is saved with.
MODEL_MODULES = (
    "torch",
    "transformers",
    "diffusers",
    "diffusers.models.unets.unet_2d_condition",
    "diffusers.models.autoencoders.autoencoder_kl",
    "transformers.models.clip.modeling_clip",
    "sdbuild.models.unet",
    "sdbuild.models.text_encoder",
    "sdbuild.models.vae",
)
COREML_MODULES = ("coremltools",)
PIPELINE_MODULES = (
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
    "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
)

UNETS = ("unet", "controlled_unet", REFINER)  # what ``chunk`` splits

# In build order: ``--until``, ``--force`` and the plan's table follow it.
STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "download",
            "1",
            "sdbuild.stages.download:run",
            preload=(*MODEL_MODULES, *PIPELINE_MODULES, "sdbuild.synthetic"),
            # A refiner's or ControlNet's own download reads its source only (Plan.sources).
            fields=("model.version", "model.revision", "model.variant", "model.allow_pickle", "source"),
            libraries=("huggingface_hub", "peft", "open-clip-torch", *TORCH_LIBS),
            scope="source",
        ),
        Stage(
            "trace",
            "2",
            "sdbuild.stages.trace:run",
            preload=(*MODEL_MODULES, "sdbuild.convert"),
            component_fields={
                "unet": ("attention", "resolution", "multires", "unet_batch_one", "encoder_sequence_length"),
                "controlled_unet": ("attention", "resolution", "multires", "unet_batch_one", "encoder_sequence_length"),
                "unet_refiner": ("attention", "resolution", "multires", "unet_batch_one", "encoder_sequence_length"),
                "controlnet": ("attention", "resolution", "multires", "unet_batch_one", "encoder_sequence_length"),
                "vae_decoder": ("resolution", "multires"),
                "vae_encoder": ("resolution", "multires"),
                "text_encoder": ("attention",),
                "text_encoder_2": ("attention",),
                "safety_checker": ("attention", "resolution"),  # resolution: the Python variant's images
                # The user's TorchScript file, by its content (its path and time are not in the key).
                "multilingual_projection": ("multilingual_projection_sha256",),
            },
            libraries=TORCH_LIBS,
            consumes=("download",),
        ),
        Stage(
            "convert",
            "2",
            "sdbuild.stages.convert:run",
            preload=(*COREML_MODULES, "sdbuild.convert"),
            fields=("target",),
            # How several resolutions become one package (functions | enumerated), and which.
            component_fields={k: ("resolution", "multires") for k in ("unet", "controlled_unet", "controlnet", "vae_decoder", "vae_encoder")},
            libraries=(*TORCH_LIBS, *COREML_LIBS),
            consumes=("trace",),
            reads=("download",),  # the checkpoint's weights, bound into the package (the trace holds placeholders)
        ),
        Stage(
            "analyze",
            "1",
            "sdbuild.stages.analyze:run",
            preload=(*MODEL_MODULES, *COREML_MODULES, "sdbuild.compress"),
            # The inputs it measures on are its own (``analysis``, defaults filled in), not the
            # resolution's: one analysis serves every resolution of the model.
            fields=("model.version", "attention", "analysis"),
            libraries=TORCH_LIBS + ("numpy", "scikit-learn"),
            resumable=True,
            consumes=("download",),
            scope="build",
            component="unet",
            applies=lambda plan, component: plan.analysis and "unet" in plan.components,
        ),
        Stage(
            "calibrate",
            "1",
            "sdbuild.generate.calibrate:run",  # it runs the image pipeline, which sits above the stages
            preload=(*MODEL_MODULES, *COREML_MODULES, "sdbuild.mil.executor", "sdbuild.generate"),
            # compression.calibration with its defaults filled in (the build graph reads them);
            # the float16 text encoder and unet it runs enter the key as upstream entries.
            fields=("calibration",),
            libraries=(*TORCH_LIBS, *COREML_LIBS),
            # The text encoder's float16 package too: built for this where it does not ship.
            consumes=("download", Input(("convert",), component="text_encoder"), "convert"),
            applies=lambda plan, component: component == "unet" and plan.calibrating,
        ),
        Stage(
            "compress",
            "1",
            "sdbuild.stages.compress:run",
            preload=(*COREML_MODULES, "sdbuild.convert", "sdbuild.compress"),
            fields=("compression",),
            libraries=(*COREML_LIBS, "scikit-learn"),
            # The pre-analysis is read by mixed-bit palettization only (the controlled unet shares the unet's).
            # W8A8: the unet's activation ranges (calibrate), where it has them.
            consumes=("convert", Input(("analyze",), when=lambda plan: plan.mixed_bit), "calibrate"),
            applies=lambda plan, component: plan.is_compressed(component),
        ),
        Stage(
            "chunk",
            "1",
            "sdbuild.stages.chunk:run",
            preload=COREML_MODULES,
            fields=("chunk",),
            libraries=COREML_LIBS,
            consumes=(PACKAGE_OF,),
            applies=lambda plan, component: plan.recipe.chunk is not None and component in UNETS,
        ),
        Stage(
            "compile",
            "1",
            "sdbuild.stages.compile:run",
            preload=COREML_MODULES,
            fields=("coremlcompiler",),  # the compiler's version, read at plan time
            libraries=("coremltools",),
            consumes=(SHIPPED,),
            applies=lambda plan, component: plan.compiler is not None,
            runners=("macos",),
        ),
        Stage(
            "bundle",
            __version__,  # the packages' metadata names sdbuild's version
            "sdbuild.stages.bundle:run",
            fields=("recipe", "family"),
            libraries=("coremltools",),
            consumes=(EVERY,),
            scope="build",
            publishes=True,
        ),
        Stage(
            "sample",
            "1",
            "sdbuild.generate.sample:run",
            preload=(*COREML_MODULES, "diffusers", "sdbuild.mil.executor", "sdbuild.generate"),
            fields=("verify.seed",),
            libraries=(*TORCH_LIBS, *COREML_LIBS),
            # Keyed by every shipped model's verify: exactly the packages the bundle it reads holds.
            consumes=("verify",),
            after=("bundle",),
            scope="build",
            applies=lambda plan, component: plan.recipe.verify.sample_image,
        ),
        Stage(
            "verify",
            "1",
            "sdbuild.stages.verify:run",
            preload=(*MODEL_MODULES, *COREML_MODULES, "sdbuild.convert", "sdbuild.mil.executor"),
            fields=("verify.samples", "verify.seed", "compute_unit"),
            libraries=(*TORCH_LIBS, *COREML_LIBS),
            consumes=("trace", "convert", PACKAGE_OF, "chunk"),
            reads=("download",),  # the checkpoint's weights for the reference, a layer at a time
            runners=("linux", "macos"),  # on macOS, Core ML itself runs the packages too
        ),
    )
}

ORDER = tuple(STAGES)


def runner_stages() -> dict[str, list[str]]:
    """The stages each CI runner runs, in build order (``sdbuild matrix``)."""
    runners: dict[str, list[str]] = {}
    for stage in STAGES.values():
        for runner in stage.runners:
            runners.setdefault(runner, []).append(stage.name)
    return runners
