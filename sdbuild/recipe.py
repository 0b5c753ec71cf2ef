"""Recipes: the YAML schema (pydantic), loading with ``extends``, and matrix expansion.

Every error names the file, the key path and, where YAML knows it, the line:
``recipes/x.yaml:7: compression.nbits: Input should be 1, 2, 4, 6 or 8 (got 5)``.
"""

from __future__ import annotations

import copy
import itertools
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sdbuild.errors import NotBuiltYet, RecipeError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
COMPONENT_NAMES = (
    "text_encoder",
    "text_encoder_2",
    "unet",
    "vae_decoder",
    "vae_encoder",
    "safety_checker",
)
COMPRESSIBLE = ("text_encoder", "text_encoder_2", "unet", "controlnet")


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
        description="hub id | local diffusers folder | single .safetensors file (local or hub-id/file.safetensors) | synthetic:tiny-sd | synthetic:tiny-sdxl"
    )
    revision: str = "main"
    variant: str | None = Field(None, description="weights variant on the hub, e.g. fp16")
    custom_vae: str | None = Field(
        None, description="VAE folder or hub id (config.json at its top) the VAE components are converted from"
    )
    refiner: str | None = None
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


class MixedBit(_Strict):
    recipe: str = Field(description="e.g. recipe_4.50_bit_mixedpalette")
    pre_analysis: str = Field("auto", description="path to a pre-analysis JSON, or auto")


class Compression(_Strict):
    nbits: Literal[1, 2, 4, 6, 8] | None = None
    linear8: bool = False
    mixed_bit: MixedBit | None = None
    group_size: int | None = Field(None, gt=0, description="per-grouped-channel palettes (iOS18/macOS15 targets)")
    components: list[Literal["text_encoder", "text_encoder_2", "unet", "controlnet"]] = ["unet", "text_encoder", "text_encoder_2"]

    @model_validator(mode="after")
    def _one_kind(self):
        kinds = [k for k, on in (("nbits", self.nbits is not None), ("linear8", self.linear8), ("mixed_bit", self.mixed_bit is not None)) if on]
        if len(kinds) != 1:
            raise ValueError("set exactly one of nbits, linear8, mixed_bit (or omit compression for float16)" + (f"; got {', '.join(kinds)}" if kinds else ""))
        if self.group_size is not None and self.nbits is None:
            raise ValueError("group_size goes with nbits")
        return self


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
    resolution: Resolution | list[Resolution] = Resolution()
    target: Literal["macOS13", "macOS14", "macOS15", "iOS16", "iOS17", "iOS18"] = "macOS14"
    compute_unit: Literal["ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE"] = "CPU_AND_NE"
    unet_batch_one: bool = False
    compression: Compression | None = None
    chunk: Chunk | None = None
    controlnet: list[str] = []
    bundle: Bundle = Bundle()
    verify: Verify = Verify()
    matrix: dict[str, list[Any]] | None = None

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        # The name becomes artifacts/builds/<name>: nothing that could leave that folder.
        if not NAME_PATTERN.match(v) or ".." in v:
            raise ValueError("must be letters, digits, '.', '_' or '-' (it names the build folder)")
        return v

    @model_validator(mode="after")
    def _controlnet_needs_batch_two(self):
        if self.controlnet and self.unet_batch_one:
            raise ValueError("controlnet with unet_batch_one: Apple's ControlNet pipelines run the unet at batch 2; remove unet_batch_one")
        if len(set(self.controlnet)) != len(self.controlnet):
            raise ValueError("controlnet lists a ControlNet twice")
        return self

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


def _compose(path: Path) -> tuple[Any, dict[tuple, int]]:
    """Parse YAML safely, keeping the 1-based line of every key path."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read recipe: {e.strerror}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{path}{line}: not valid YAML: {problem}") from None
    lines: dict[tuple, int] = {}

    def walk(n, prefix):
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = prefix + (k.value,)
                lines[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[prefix + (i,)] = v.start_mark.line + 1
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
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise RecipeError(_format_error(first, located, path)) from None


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
    out = []
    if len(recipe.resolutions) > 1:
        out.append("resolution: a list of shapes (one model, several shapes) is not built yet (issue: conversion modules)")
    if recipe.model.refiner:
        out.append("model.refiner: the SDXL refiner is not built yet")
    return out


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
    variants = []
    for values in itertools.product(*(base.matrix[k] for k in keys)):
        overrides = dict(zip(keys, values))
        suffix = "-".join(f"{k.split('.')[-1]}-{_slug(v)}" for k, v in overrides.items())
        name = f"{base.name}-{suffix}"
        variants.append((name, {**overrides, "name": name, "matrix": None}))
    return variants
