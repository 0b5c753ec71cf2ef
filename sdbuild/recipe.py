"""Recipes: the YAML schema (pydantic), loading with ``extends``, and matrix expansion.

Every error names the file, the key path and, where YAML knows it, the line:
``recipes/x.yaml:7: compression.nbits: Input should be 1, 2, 4, 6 or 8 (got 5)``.
"""

from __future__ import annotations

import copy
import itertools
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from sdbuild.errors import NotBuiltYet, RecipeError
from sdbuild.models import COMPONENTS
from sdbuild.families import all_components

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# What a recipe may list under components: every family's, and the safety checker, in the modules' order.
COMPONENT_NAMES = tuple(c for c in COMPONENTS if c in {*all_components(), "safety_checker"})
COMPRESSIBLE = ("text_encoder", "text_encoder_2", "unet", "controlnet", "multilingual_projection")
# NLContextualEmbedding, which a multilingual projection's input comes from, exists from macOS 14 / iOS 17.
MULTILINGUAL_TARGETS = ("macOS14", "macOS15", "iOS17", "iOS18")
COMPUTE_UNITS = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")  # Core ML's, by name
# Multifunction packages (one function per resolution) exist from Core ML's iOS18 / macOS15 release.
MULTIFUNCTION_TARGETS = ("macOS15", "iOS18")
# Core ML's quantize/dequantize ops (int8 activations) exist from iOS17 / macOS14.
ACTIVATION_TARGETS = ("macOS14", "macOS15", "iOS17", "iOS18")


def function_name(height: int, width: int) -> str:
    """The name of a resolution's function in a multifunction package, in image pixels: ``h512_w768``."""
    return f"h{height}_w{width}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Lora(_Strict):
    path: str = Field(description="LoRA .safetensors file (kohya/A1111 or diffusers/PEFT names): local path or hub-id/file.safetensors")
    strength: float = Field(1.0, description="scale of the LoRA's change, fused into the weights before tracing")


class Embedding(_Strict):
    path: str = Field(description="textual-inversion embedding file: local path or hub-id/file.safetensors")
    token: str = Field(min_length=1, description="the prompt word that calls it, e.g. <my-style>")


class ModelSource(_Strict):
    version: str = Field(
        description="hub id | local diffusers folder | single .safetensors file (local or hub-id/file.safetensors) | synthetic:tiny-sd | synthetic:tiny-sdxl | synthetic:tiny-sdxl-refiner (a refiner alone: image to image)"
    )
    revision: str = "main"
    variant: str | None = Field(None, description="weights variant on the hub, e.g. fp16")
    custom_vae: str | None = Field(
        None, description="VAE folder or hub id (config.json at its top) the VAE components are converted from"
    )
    refiner: str | None = Field(
        None,
        description="SDXL refiner (hub id | local diffusers folder | single .safetensors file | synthetic:tiny-sdxl-refiner): "
        "built as UnetRefiner beside the base, which it shares TextEncoder2 with",
    )
    allow_pickle: bool = Field(False, description="allow .bin/.ckpt pickled weights (unsafe); default: safetensors only")
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="a single file's objective; default: detected (SD 2.x: v_prediction, others: epsilon)"
    )
    loras: list[Lora] = []
    embeddings: list[Embedding] = []

    @field_validator("embeddings")
    @classmethod
    def _distinct_tokens(cls, v):
        tokens = [e.token for e in v]
        if len(set(tokens)) != len(tokens):
            raise ValueError("two embeddings share a token")
        return v


class Resolution(_Strict):
    height: int = Field(512, gt=0, multiple_of=8)
    width: int = Field(512, gt=0, multiple_of=8)


class AnalysisInputs(_Strict):
    """What every measurement of the mixed-bit pre-analysis runs the unet on: seeded random inputs.

    Smaller than a generation's (one 16x16 latent, not a guidance pair of
    64x64 for SD 1.5 at 512x512): the analysis runs the unet about 1,500
    times, and at this size SD 1.5's takes well under an hour on two cores
    (README: the mixed-bit pre-analysis at full size). The unet's weights do
    not depend on the latent size: the recipe it makes fits every resolution.
    """

    samples: int = Field(1, ge=1, description="seeded inputs, each one forward per measurement; PSNR is their mean")
    batch: Literal[1, 2] = Field(1, description="rows per input: 1, or 2 as a guidance pair runs")
    latent: int = Field(16, gt=0, multiple_of=8, description="latent height and width (image pixels / 8 for SD 1.x/2.x/XL)")


class MixedBit(_Strict):
    recipe: str = Field(description="e.g. recipe_4.50_bit_mixedpalette")
    pre_analysis: str = Field("auto", description="path to a pre-analysis JSON, or auto")
    analysis: AnalysisInputs | None = Field(None, description="what the pre-analysis (auto) measures on; default: AnalysisInputs()")

    @model_validator(mode="after")
    def _analysis_of_auto(self):
        if self.analysis is not None and self.pre_analysis != "auto":
            raise ValueError("analysis goes with pre_analysis: auto (it says what the pre-analysis built here measures on)")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        data = handler(self)
        # Added later: a recipe without it, or with its defaults written out, keeps its compress key.
        if data.get("analysis") in (None, AnalysisInputs().model_dump(mode="json")):
            data.pop("analysis", None)
        return data


# The default calibration set for int8 activations: varied subjects, styles and lighting, as
# Apple's converter calibrates on a list of descriptive prompts (its own list is longer).
CALIBRATION_PROMPTS = (
    "a glass of iced tea with lemon slices on a wooden table, warm afternoon light, photograph",
    "a quiet living room with a large window over the sea at night, minimalist furniture, 3D render",
    "a tall office building of glass and steel under a clear blue sky, wide angle, detailed",
    "a small cat curled up on a knitted blanket, soft indoor lighting, digital painting",
    "a rocket lifting off at dusk seen from a distant hill, cinematic, highly detailed matte painting",
    "a coral reef with bright fish swimming between rocks, underwater photograph",
    "an old pocket watch with brass gears, macro photograph, sharp focus",
    "a castle on a snowy mountain ridge, dramatic clouds, oil painting",
)


class Calibration(_Strict):
    """The prompts int8 activations are calibrated on, run through the float16 bundle's own pipeline."""

    prompts: list[str] = Field(default_factory=lambda: list(CALIBRATION_PROMPTS), min_length=1)
    steps: int = Field(20, ge=1, description="denoising steps per prompt (the unet runs once per step)")
    seed: int = Field(0, description="the initial latents' seed, the same for every prompt")
    guidance_scale: float = Field(7.5, ge=0, description="as in generation: above 1, both guidance halves run")


N_M_SPARSITY = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
# Compression keys added after compress entries were first cached: a dump leaves them out while
# unset, so the compress key of a recipe that does not use them stays what it was.
_LATER_COMPRESSION_KEYS = ("sparsity", "lut_dtype", "activations", "calibration")


class Compression(_Strict):
    nbits: Literal[1, 2, 4, 6, 8] | None = None
    linear8: bool = False
    mixed_bit: MixedBit | None = None
    group_size: int | None = Field(None, gt=0, description="per-grouped-channel palettes (iOS18/macOS15 targets)")
    sparsity: float | str | None = Field(
        None,
        description="magnitude pruning: the fraction of each weight zeroed (0.5), or 'n:m' (n of every m zeroed, "
        "quoted in YAML); alone, or joint with nbits (iOS18/macOS15 targets)",
    )
    lut_dtype: Literal["int8"] | None = Field(None, description="palette entries stored as int8 with a scale (with nbits; iOS18/macOS15)")
    activations: Literal["int8"] | None = Field(
        None, description="W8A8: int8 activations calibrated on prompts (with linear8; the SD 1.x/2.x unet only)"
    )
    calibration: Calibration | None = Field(None, description="what int8 activations are calibrated on; default: Calibration()")
    components: list[Literal[COMPRESSIBLE]] = ["unet", "text_encoder", "text_encoder_2"]

    @field_validator("sparsity")
    @classmethod
    def _sparsity_form(cls, v):
        if v is None:
            return v
        if isinstance(v, str):
            m = N_M_SPARSITY.match(v)
            if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
                raise ValueError(f"{v!r} is not n:m with 1 <= n <= m (e.g. '2:4')")
            return f"{int(m.group(1))}:{int(m.group(2))}"
        if not 0 < v < 1:
            raise ValueError(
                f"{v!r} must be a fraction between 0 and 1 (0.5), or 'n:m' in quotes ('2:4': YAML reads 2:4 unquoted as a number)"
            )
        return float(v)

    @model_validator(mode="after")
    def _one_kind(self):
        kinds = [k for k, on in (("nbits", self.nbits is not None), ("linear8", self.linear8), ("mixed_bit", self.mixed_bit is not None)) if on]
        if len(kinds) > 1 or (not kinds and self.sparsity is None):
            raise ValueError("set exactly one of nbits, linear8, mixed_bit, or sparsity alone (or omit compression for float16)" + (f"; got {', '.join(kinds)}" if kinds else ""))
        if self.group_size is not None and self.nbits is None:
            raise ValueError("group_size goes with nbits")
        if self.sparsity is not None and kinds not in ([], ["nbits"]):
            raise ValueError(f"sparsity goes alone or with nbits (joint sparse + palettized), not with {kinds[0]}")
        if self.lut_dtype is not None and self.nbits is None:
            raise ValueError("lut_dtype goes with nbits (it is the type of the palette entries)")
        if self.activations is not None and not self.linear8:
            raise ValueError("activations: int8 goes with linear8: true (W8A8: 8-bit weights and activations)")
        if self.activations is not None and self.components != ["unet"]:
            raise ValueError(
                "activations: int8 quantizes the unet's activations only (as Apple's converter); "
                "set components: [unet] (other components: a second recipe with linear8 alone)"
            )
        if self.calibration is not None and self.activations is None:
            raise ValueError("calibration goes with activations: int8 (it is what the activations are calibrated on)")
        return self

    @property
    def calibration_settings(self) -> dict | None:
        """The calibration int8 activations use (the default where the recipe sets none); None without them."""
        if self.activations is None:
            return None
        return (self.calibration or Calibration()).model_dump(mode="json")

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        data = handler(self)
        for key in _LATER_COMPRESSION_KEYS:
            if data.get(key) is None:
                data.pop(key, None)
        return data


class Chunk(_Strict):
    unet: int = Field(2, ge=2, le=8, description="number of consecutive unet parts")


class Bundle(_Strict):
    layout: Literal["swift", "python", "both"] = "swift"


class Verify(_Strict):
    psnr_min_db: float = 35.0
    samples: int = Field(2, ge=1)
    seed: int = 93
    sample_image: bool = False


class Recipe(_Strict):
    """One model variant. See DESIGN.md for what each key means."""

    name: str
    model: ModelSource
    components: list[Literal[COMPONENT_NAMES]] | None = Field(None, description="default: by model family")
    attention: Literal["ORIGINAL", "SPLIT_EINSUM", "SPLIT_EINSUM_V2"] = "SPLIT_EINSUM"
    resolution: Resolution | Annotated[list[Resolution], Field(min_length=1)] = Resolution()
    multires: Literal["functions", "enumerated"] | None = Field(
        None,
        description="several resolutions as: functions (one static-shape function per resolution, weights stored once; "
        "macOS15/iOS18 targets; the default there) | enumerated (ct.EnumeratedShapes, macOS13/iOS16 and later)",
    )
    target: Literal["macOS13", "macOS14", "macOS15", "iOS16", "iOS17", "iOS18"] = "macOS14"
    compute_unit: Literal[COMPUTE_UNITS] = "CPU_AND_NE"
    unet_batch_one: bool = False
    compression: Compression | None = None
    chunk: Chunk | None = None
    controlnet: list[str] = []
    bundle: Bundle = Bundle()
    verify: Verify = Verify()
    # After target, components and verify: its validator reads them.
    multilingual_projection: str | None = Field(
        None,
        description="TorchScript file (relative to the recipe's folder) mapping NLContextualEmbedding [1, 256, 512] "
        "to the unet's width: built as MultilingualTextEncoderProjection; the unet then takes 256 tokens",
    )
    matrix: dict[str, list[Any]] | None = None

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        # The name becomes artifacts/builds/<name>: nothing that could leave that folder.
        if not NAME_PATTERN.match(v) or ".." in v:
            raise ValueError("must be letters, digits, '.', '_' or '-' (it names the build folder)")
        return v

    @model_validator(mode="after")
    def _multires_fits(self):
        names = [function_name(r.height, r.width) for r in self.resolutions]
        if len(set(names)) != len(names):
            raise ValueError("resolution: lists a shape twice")
        if len(names) > 1 and self.multires_kind == "functions" and self.target not in MULTIFUNCTION_TARGETS:
            raise ValueError(
                f"resolution: several shapes as multifunction packages need target macOS15 or iOS18 (got target: {self.target}); "
                "set target: macOS15, or multires: enumerated (one package with ct.EnumeratedShapes, macOS13/iOS16 and later)"
            )
        if len(names) > 1 and self.multires_kind == "enumerated" and self.attention == "SPLIT_EINSUM_V2":
            raise ValueError(
                "multires: enumerated with attention SPLIT_EINSUM_V2: its query chunks are fixed by the traced size; "
                "use attention SPLIT_EINSUM or ORIGINAL, or multires: functions"
            )
        if len(names) > 1 and self.chunk is not None:
            raise ValueError(
                "chunk with several resolutions: the unet chunker splits one static-shape program, not a multifunction "
                "or enumerated one; remove chunk, or build one recipe per resolution"
            )
        return self

    @property
    def analysis_settings(self) -> dict:
        """The inputs the unet's pre-analysis measures on: the recipe's, or ``AnalysisInputs()``'s defaults."""
        mixed = self.compression.mixed_bit if self.compression else None
        return ((mixed.analysis if mixed else None) or AnalysisInputs()).model_dump(mode="json")

    @property
    def multires_kind(self) -> str | None:
        """How several resolutions are built (``functions`` | ``enumerated``); None for one resolution."""
        if len(self.resolutions) < 2:
            return None
        return self.multires or "functions"

    @field_validator("compression")
    @classmethod
    def _activations_fit(cls, v, info):
        if v is None or v.activations is None:
            return v
        target, resolution = info.data.get("target"), info.data.get("resolution")
        if target is not None and target not in ACTIVATION_TARGETS:
            raise ValueError(f"activations: int8 needs target macOS14 or iOS17 or later (Core ML's quantize ops); got target: {target}")
        if isinstance(resolution, list) and len(resolution) > 1:
            # Calibration runs one static-shape unet through the text-to-image pipeline.
            raise ValueError("activations: int8 is not built for several resolutions (one calibration per shape): build one recipe per resolution")
        return v

    @model_validator(mode="after")
    def _controlnet_needs_batch_two(self):
        if self.controlnet and self.compression is not None and self.compression.activations is not None:
            raise ValueError(
                "controlnet with compression.activations: int8 is not built (the controlled unet takes residuals "
                "the calibration does not run); remove one of them"
            )
        if self.controlnet and self.unet_batch_one:
            raise ValueError("controlnet with unet_batch_one: Apple's ControlNet pipelines run the unet at batch 2; remove unet_batch_one")
        if len(set(self.controlnet)) != len(self.controlnet):
            raise ValueError("controlnet lists a ControlNet twice")
        return self

    @field_validator("multilingual_projection")
    @classmethod
    def _multilingual_needs(cls, v, info):
        if not v:
            return v
        target, components, verify = (info.data.get(k) for k in ("target", "components", "verify"))
        if target is not None and target not in MULTILINGUAL_TARGETS:
            raise ValueError(f"needs target macOS14 or iOS17 or later (NLContextualEmbedding's first releases); got target: {target}")
        if components and {"text_encoder", "text_encoder_2"} & set(components):
            raise ValueError(
                "replaces the text encoder (the unet then takes the embedding's 256 tokens, not CLIP's 77): "
                "remove text_encoder from components"
            )
        if verify is not None and verify.sample_image:
            raise ValueError("the sample image needs the CLIP text encoder: set verify.sample_image: false")
        compression = info.data.get("compression")
        if compression is not None and compression.activations is not None:
            raise ValueError("with compression.activations: int8 is not built (calibration runs the CLIP text encoder); remove one of them")
        return v

    @property
    def encoder_sequence_length(self) -> int:
        """Tokens in the unet's ``encoder_hidden_states``: CLIP's 77, or the multilingual embedding's 256."""
        from sdbuild.models import MULTILINGUAL_TOKENS, TOKENS

        return MULTILINGUAL_TOKENS if self.multilingual_projection else TOKENS

    @field_validator("components")
    @classmethod
    def _unique(cls, v):
        if v is not None and len(set(v)) != len(v):
            raise ValueError("lists a component twice")
        return v

    def get(self, dotted: str) -> Any:
        """The value at a dotted path (``compression.nbits``), None where a parent is unset."""
        node: Any = self
        for part in dotted.split("."):
            if node is None:
                return None
            node = node.get(part) if isinstance(node, dict) else getattr(node, part)
        if isinstance(node, list):  # e.g. several resolutions: plain data, as a single one is
            return [n.model_dump(mode="json") if isinstance(n, BaseModel) else n for n in node]
        return node.model_dump(mode="json") if isinstance(node, BaseModel) else node

    @property
    def resolutions(self) -> list[Resolution]:
        return self.resolution if isinstance(self.resolution, list) else [self.resolution]


# --- loading -----------------------------------------------------------------


class _Located:
    """Where each key path of a merged recipe was written: file and line."""

    def __init__(self):
        self.where: dict[tuple, tuple[Path, int]] = {}

    def find(self, path: tuple) -> tuple[Path, int] | None:
        # The nearest written ancestor, for values whose key pydantic adds (e.g. a list index).
        while True:
            if path in self.where:
                return self.where[path]
            if not path:
                return None
            path = path[:-1]


MAX_RECIPE_BYTES = 1 << 20  # recipes are a few hundred bytes; anything near this is not one
MAX_DEPTH = 32  # nesting of mappings and lists
MAX_ALIASES = 100  # uses of *anchor
MAX_NODES = 20_000
MAX_VARIANTS = 256  # a matrix expands into at most this many builds  # values after aliases are expanded (a YAML alias bomb is billions)


class _RecipeLoader(yaml.SafeLoader):
    """A SafeLoader that refuses deep nesting and alias expansion beyond small bounds, as it composes."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise _Refused(self.peek_event().start_mark, f"more than {MAX_ALIASES} aliases (*name); write the values out")
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refused(self.peek_event().start_mark, f"nested more than {MAX_DEPTH} levels deep")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _Refused(Exception):
    def __init__(self, mark, problem: str):
        super().__init__(problem)
        self.mark, self.problem = mark, problem


def _read_text(path: Path) -> str:
    """The recipe's text: refused (one line) when too big, binary or not UTF-8."""
    try:
        if path.is_dir():
            raise RecipeError(f"{path}: is a folder, not a recipe file")
        with open(path, "rb") as f:  # read at most one byte past the limit: /dev/zero is not a recipe either
            raw = f.read(MAX_RECIPE_BYTES + 1)
        if len(raw) > MAX_RECIPE_BYTES:
            raise RecipeError(f"{path}:1: more than {MAX_RECIPE_BYTES >> 20} MiB is not a recipe (the limit is {MAX_RECIPE_BYTES >> 20} MiB)")
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read recipe: {e.strerror}") from None
    if b"\0" in raw:
        line = raw[: raw.index(b"\0")].count(b"\n") + 1
        raise RecipeError(f"{path}:{line}: a binary file (NUL byte), not a YAML recipe")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise RecipeError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save the recipe as UTF-8") from None


def _expanded(node, memo: dict) -> tuple[int, int]:
    """(values, depth) ``node`` stands for once aliases are expanded, in linear time (shared nodes are measured once)."""
    if id(node) in memo:
        if memo[id(node)] is None:
            raise _Refused(node.start_mark, "an alias refers to a value that contains it")
        return memo[id(node)]
    memo[id(node)] = None  # in progress: meeting it again below is a cycle
    children = []
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    size, depth = 1, 1
    for child in children:
        s, d = _expanded(child, memo)
        size, depth = min(size + s, MAX_NODES + 1), max(depth, d + 1)
    memo[id(node)] = (size, depth)
    return size, depth


def _check_keys(node, path: Path) -> None:
    """Duplicate keys in one mapping are an error (YAML says so; PyYAML keeps the last silently)."""
    seen: set[int] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n, yaml.MappingNode):
            keys: dict = {}
            for k, v in n.value:
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    if k.value in keys:
                        raise RecipeError(
                            f"{path}:{k.start_mark.line + 1}: {k.value}: duplicate key (first at line {keys[k.value]}); keep one"
                        )
                    keys[k.value] = k.start_mark.line + 1
                stack += [k, v]
        elif isinstance(n, yaml.SequenceNode):
            stack += n.value


def _compose(path: Path) -> tuple[Any, dict[tuple, int]]:
    """Parse YAML safely, keeping the 1-based line of every key path.

    Bounded: size, nesting depth, aliases and their expansion are limited, so
    a hostile file fails fast in little memory, with one line.
    """
    text = _read_text(path)
    loader = None
    try:
        loader = _RecipeLoader(text)  # refuses unprintable characters already
        node = loader.get_single_node()
        if node is not None:
            size, depth = _expanded(node, {})
            if size > MAX_NODES:
                raise _Refused(node.start_mark, f"expands to more than {MAX_NODES} values (aliases?)")
            if depth > MAX_DEPTH:
                raise _Refused(node.start_mark, f"nested more than {MAX_DEPTH} levels deep once aliases are expanded")
            _check_keys(node, path)
        data = loader.construct_document(node) if node is not None else None
    except _Refused as e:
        raise RecipeError(f"{path}:{e.mark.line + 1}: not a recipe: {e.problem}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        if isinstance(e, yaml.reader.ReaderError):
            line = f":{text[: e.position].count(chr(10)) + 1}"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{path}{line}: not valid YAML: {problem}") from None
    except (RecursionError, ValueError, TypeError, OverflowError) as e:
        # The constructor meets values YAML allows and Python does not (e.g. a list used as a key).
        raise RecipeError(f"{path}: not a recipe: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        if loader is not None:
            loader.dispose()
    lines: dict[tuple, int] = {}

    def walk(n, prefix):
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = prefix + (k.value if isinstance(k, yaml.ScalarNode) else f"<{k.id}>",)
                lines.setdefault(key, k.start_mark.line + 1)
                walk(v, key)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines.setdefault(prefix + (i,), v.start_mark.line + 1)
                walk(v, prefix + (i,))

    if node is not None:
        walk(node, ())
    return data, lines


def _extends_line(path: Path) -> int:
    return _compose(path)[1].get(("extends",), 1)


def _deep_merge(base: dict, child: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in child.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _load_tree(path: Path, located: _Located, stack: tuple[Path, ...]) -> dict:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in stack + (path,))
        raise RecipeError(f"{stack[-1]}:{_extends_line(stack[-1])}: extends: cyclic extends: {chain}")
    data, lines = _compose(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}:1: a recipe is a mapping of keys (name, model, …), got {type(data).__name__}")
    parent = data.pop("extends", None)
    merged: dict = {}
    if parent is not None:
        if not isinstance(parent, str):
            raise RecipeError(f"{path}:{lines.get(('extends',), 1)}: extends: must be a path to a recipe file")
        parent_path = (path.parent / parent)
        if not parent_path.is_file():
            raise RecipeError(
                f"{path}:{lines.get(('extends',), 1)}: extends: file not found: {parent_path} (paths are relative to the recipe's folder)"
            )
        merged = _load_tree(parent_path, located, stack + (path,))
    for key, line in lines.items():
        if key and key[0] != "extends":
            located.where[key] = (path, line)
    return _deep_merge(merged, data)


def _format_error(err: dict, located: _Located, path: Path) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and (p.startswith("function-") or p in ("literal[", ))))
    # pydantic adds union branch names (e.g. 'Resolution', 'list[Resolution]') to the location.
    loc = tuple(p for p in loc if not (isinstance(p, str) and (p[:1].isupper() or "[" in p)))
    key = ".".join(str(p) for p in loc) or "(top level)"
    where = located.find(loc)
    file, line = where if where else (path, None)
    prefix = f"{file}:{line}" if line else f"{file}"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key" + _allowed_hint(loc)
    elif err["type"] == "missing":
        msg = "required key is missing: add it to the recipe"
    elif "input" in err and not isinstance(err["input"], (dict, list)) and err["type"] != "value_error":
        msg += f" (got {err['input']!r})"
    return f"{prefix}: {key}: {msg}"


def _allowed_hint(loc: tuple) -> str:
    model: type[BaseModel] | None = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(part) if model else None
        ann = field.annotation if field else None
        model = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    if model is None:
        return ""
    return f"; allowed keys here: {', '.join(model.model_fields)}"


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read, merge (``extends``) and validate the recipe at ``path``.

    ``overrides`` maps dotted key paths to values (used by matrix variants).
    Raises RecipeError with one line naming file, key path and line.
    """
    path = Path(path)
    located = _Located()
    data = _load_tree(path, located, ())
    data.setdefault("name", path.stem)
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
        # A matrix value's errors point at the matrix line that gave it.
        if ("matrix", dotted) in located.where:
            located.where.setdefault(tuple(dotted.split(".")), located.where[("matrix", dotted)])
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise RecipeError(_format_error(first, located, path)) from None


def key_location(path: str | Path, *key: str | int) -> str:
    """``file:line`` where ``key`` (a key path) was written in the recipe or a recipe it extends; the file alone if unknown."""
    located = _Located()
    _load_tree(Path(path), located, ())
    where = located.find(tuple(key))
    return f"{where[0]}:{where[1]}" if where else str(path)


def check_local_sources(recipe: Recipe, path: str | Path) -> None:
    """Folders the recipe names (model.version, model.custom_vae, controlnet) must exist and be diffusers folders.

    Checked before any work and by ``plan`` alike; a missing folder is the
    user's input (exit 2, file:line), not a download failure.
    """
    from sdbuild.synthetic import is_synthetic

    named = [(("model", "version"), recipe.model.version, "model_index.json")]
    if recipe.model.refiner:
        named.append((("model", "refiner"), recipe.model.refiner, "model_index.json"))
    if recipe.model.custom_vae:
        named.append((("model", "custom_vae"), recipe.model.custom_vae, "config.json"))
    named += [(("controlnet", i), name, "config.json") for i, name in enumerate(recipe.controlnet)]
    for key, value, marker in named:
        dotted = ".".join(str(k) for k in key)
        if is_synthetic(value):
            continue
        if key in (("model", "version"), ("model", "refiner")) and Path(value).suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
            continue  # a single-file checkpoint: the download stage resolves it (stages/download.resolve_file)
        folder = Path(value).expanduser()
        if folder.is_dir():
            if not (folder / marker).is_file():
                raise RecipeError(f"{key_location(path, *key)}: {dotted}: {folder.resolve()} is not a diffusers folder (no {marker})")
        elif value.startswith((".", "/", "~")) or value.count("/") != 1:
            raise RecipeError(
                f"{key_location(path, *key)}: {dotted}: folder not found: {folder.absolute()} "
                "(a local diffusers folder, relative to the current folder, or a hub id owner/name)"
            )


def check_variants(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """Expand and validate every variant of a recipe, as ``run`` would; returns them (name, overrides)."""
    variants = expand_matrix(path)
    for _, overrides in variants:
        recipe = load_recipe(path, overrides)
        check_buildable(recipe, path)
        check_local_sources(recipe, path)
    return variants


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"matrix: {dotted}: '{part}' is not a mapping")
    node[parts[-1]] = value


def recipe_schema() -> dict:
    """The JSON schema of a recipe, for editors (``extends`` added)."""
    schema = Recipe.model_json_schema()
    schema["properties"]["extends"] = {"type": "string", "description": "path of a recipe to deep-merge under this one"}
    schema["required"] = [r for r in schema.get("required", []) if r != "name"]
    return schema


# --- features whose stages are not built yet ---------------------------------


def unbuilt_features(recipe: Recipe) -> list[str]:
    """One line per recipe setting that asks for a stage this sdbuild cannot run yet."""
    return []


def check_buildable(recipe: Recipe, path: Path | str) -> None:
    """Stop before any work when the recipe asks for something not built yet."""
    missing = unbuilt_features(recipe)
    if missing:
        raise NotBuiltYet(f"{path}: {missing[0]}")


# --- matrix ------------------------------------------------------------------


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", str(value)).strip("_") or "x"


def expand_matrix(recipe_path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """The variants of a recipe: (name, overrides). A recipe without ``matrix`` is one variant."""
    base = load_recipe(recipe_path)
    if not base.matrix:
        return [(base.name, {})]
    keys = list(base.matrix)
    count = 1
    for k in keys:
        count *= len(base.matrix[k])
    if count > MAX_VARIANTS:
        raise RecipeError(f"{key_location(recipe_path, 'matrix')}: matrix: {count} variants; the limit is {MAX_VARIANTS}: split the recipe")
    variants = []
    for values in itertools.product(*(base.matrix[k] for k in keys)):
        overrides = dict(zip(keys, values))
        suffix = "-".join(f"{k.split('.')[-1]}-{_slug(v)}" for k, v in overrides.items())
        name = f"{base.name}-{suffix}"
        variants.append((name, {**overrides, "name": name, "matrix": None}))
    return variants
