"""A component's module with the checkpoint's weights bound one layer at a time.

``lazy_component`` builds what ``build_component`` builds (same module, same
inputs and outputs) without reading a weight: the checkpoint's own model is
made on the meta device from its config, and every parameter of ours is
traced back to the checkpoint key ``build_component`` fills it from. Each
module then gets its parameters just before it runs and drops them right
after (forward pre and post hooks), read from the checkpoint's safetensors
file one tensor at a time and widened to float32 with
``.to(float32)``, the values ``from_pretrained`` and ``load_weights`` give
today. Where that mapping cannot be shown (a key the checkpoint lacks, a
weight changed after loading, no safetensors file, a shape that does not fit)
it raises ``NotLazy`` saying why, and the caller keeps the fully loaded path.

    model, weights = lazy_component("unet", checkpoint, options)
    with weights.bound():   # hooks on; nothing is read until a layer runs
        out = model.module(*inputs)
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

# The weight files ``from_pretrained`` reads, by library: one file, or an index of shards.
WEIGHT_FILES = {"diffusers": "diffusion_pytorch_model.safetensors", "transformers": "model.safetensors"}


class NotLazy(Exception):
    """The checkpoint-to-module mapping of a component cannot be shown; the message says why."""


@dataclass
class _Reference:
    """A checkpoint model made on the meta device: where ``from_pretrained`` would have read its weights."""

    folder: Path
    library: str
    keys: dict[int, str] = field(default_factory=dict)  # id of a state-dict tensor handed out -> its key
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # kept alive, so the ids stay theirs


@dataclass
class _Source:
    """Where one tensor of ours comes from: the checkpoint key of a reference, and the shape it has there."""

    reference: _Reference
    key: str
    shape: tuple[int, ...]


class _Recorder:
    """While building: the meta references made, and for each tensor ``load_weights`` put into a module, its source."""

    def __init__(self):
        self.references: list[_Reference] = []
        self.sources: dict[int, _Source] = {}  # id of a module's parameter (as loaded) -> its source
        self.loaded: list[torch.Tensor] = []  # those parameters, kept alive so that no other tensor takes their ids
        self.unmapped: list[str] = []

    def meta_model(self, cls, folder, library: str):
        """``cls`` made from ``folder``'s config on the meta device; its ``state_dict`` hands out tensors we can recognize."""
        folder = Path(folder)
        with torch.device("meta"):
            if library == "diffusers":
                model = cls.from_config(cls.load_config(folder))
            else:
                model = cls._from_config(cls.config_class.from_pretrained(folder))
        reference = _Reference(folder, library)
        reference.tensors = dict(nn.Module.state_dict(model))
        reference.keys = {id(t): key for key, t in reference.tensors.items()}
        self.references.append(reference)
        # The module builders read the checkpoint model's weights through state_dict(), renaming keys only.
        model.state_dict = lambda *args, **kwargs: dict(reference.tensors)
        return model.eval()

    def load_weights(self, load):
        """``layers.load_weights`` that first notes, for each key of ours, which reference tensor it is given."""

        def recording(module, state_dict, source):
            given = {}
            for key, value in state_dict.items():
                found = next((r for r in self.references if r.keys.get(id(value)) is not None), None)
                if found is None:
                    self.unmapped.append(f"{source}: {key}")
                    continue
                given[key] = _Source(found, found.keys[id(value)], tuple(value.shape))
            loaded = load(module, state_dict, source)
            for name, tensor in [*loaded.named_parameters(), *loaded.named_buffers()]:
                if name in given:
                    self.sources[id(tensor)] = given[name]
                    self.loaded.append(tensor)
            return loaded

        return recording


@contextlib.contextmanager
def _recording():
    """Within: ``from_pretrained`` of diffusers and transformers models makes them on the meta device (their
    config read, no weight), and sdbuild's ``load_weights`` records what it binds. Yields the ``_Recorder``."""
    from diffusers.models.modeling_utils import ModelMixin
    from transformers.modeling_utils import PreTrainedModel

    from sdbuild.models import layers

    recorder = _Recorder()
    patched = []

    def meta_from_pretrained(library):
        def from_pretrained(cls, folder, *args, **kwargs):
            return recorder.meta_model(cls, folder, library)

        return classmethod(from_pretrained)

    try:
        for owner, library in ((ModelMixin, "diffusers"), (PreTrainedModel, "transformers")):
            patched.append((owner, "from_pretrained", owner.__dict__["from_pretrained"]))
            owner.from_pretrained = meta_from_pretrained(library)
        # Each model module imported load_weights by name: record in all of them.
        original = layers.load_weights
        recording = recorder.load_weights(original)
        for name, module in list(sys.modules.items()):
            if name.startswith("sdbuild.models.") and getattr(module, "load_weights", None) is original:
                patched.append((module, "load_weights", original))
                module.load_weights = recording
        yield recorder
    finally:
        for owner, name, value in reversed(patched):
            setattr(owner, name, value)


def lazy_component(component: str, checkpoint: Path, options, vae: Path | None = None):
    """``build_component(component, checkpoint, options, vae)`` with no weight read, and the ``LazyWeights``
    that bind each of its module's layers' weights from the checkpoint while the layer runs: (model, weights).

    Raises ``NotLazy`` where the mapping from checkpoint tensors to the module's cannot be shown.
    """
    from sdbuild.convert import skip_weight_init
    from sdbuild.models import build_component
    # The model modules, imported before recording so their load_weights are found.
    from sdbuild.models import controlnet, safety_checker, text_encoder, unet, vae as vae_module  # noqa: F401

    with skip_weight_init(), _recording() as recorder:
        model = build_component(component, checkpoint, options, vae=vae)
    if recorder.unmapped:
        raise NotLazy(f"a weight does not come straight from the checkpoint ({recorder.unmapped[0]})")
    weights = LazyWeights(model.module, recorder.sources)
    weights.check_dry_run(model.inputs)
    return model, weights


def _weight_files(reference: _Reference) -> list[Path]:
    """The safetensors files ``from_pretrained`` read for ``reference``: its library's file or index, else the only one."""
    name = WEIGHT_FILES[reference.library]
    index = reference.folder / f"{name}.index.json"
    if index.is_file():
        return sorted({reference.folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    if (reference.folder / name).is_file():
        return [reference.folder / name]
    found = sorted(reference.folder.glob("*.safetensors"))
    if len(found) != 1:
        raise NotLazy(f"{reference.folder}: no {name} and {len(found)} other safetensors files: cannot tell which was loaded")
    return found


# safetensors' dtype names -> torch's, for the floating-point weights a module takes.
_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


class _Checkpoint:
    """A reference's safetensors files: each key's file, shape and dtype (from the headers), and its tensor
    on demand, read from the file into memory of its own.

    Read, not memory-mapped: every page of a mapping that was touched counts as resident for as long as
    the file stays mapped, which would bring the whole checkpoint back into the process (3.4 GiB for SD
    1.5's float32 unet) however few tensors are alive. The layout is safetensors' own: an 8-byte
    little-endian header size, a JSON header (dtype, shape, data_offsets per key), then the data.
    """

    def __init__(self, reference: _Reference | None, files: list[Path] | None = None):
        """The files ``from_pretrained`` read for ``reference``; or, with no reference, ``files`` (keys as stored)."""
        self.where: dict[str, tuple[Path, dict, int]] = {}  # key -> (file, its header entry, data start)
        for path in _weight_files(reference) if reference is not None else files:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            for key, entry in header.items():
                if key != "__metadata__":
                    self.where[key] = (path, entry, 8 + size)
        self.prefix = self._prefix(reference) if reference is not None else ""

    def _prefix(self, reference: _Reference) -> str:
        """What the checkpoint puts before the model's keys: nothing, or one prefix for all of them
        (transformers' CLIP text models load ``text_model.*`` as ``*``). NotLazy if neither fits."""
        keys = list(reference.tensors)
        if all(k in self.where for k in keys):
            return ""
        missing = next(k for k in keys if k not in self.where)
        candidates = {c[: -len(missing)] for c in self.where if c.endswith("." + missing)}
        for prefix in sorted(candidates):
            if all(prefix + k in self.where for k in keys):
                return prefix
        raise NotLazy(f"{reference.folder}: the checkpoint lacks {missing}")

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.where[self.prefix + key][1]["shape"])

    def dtype(self, key: str) -> str:
        return self.where[self.prefix + key][1]["dtype"]

    def file(self, key: str) -> tuple[Path, str]:
        """The file holding ``key``, and its key there (the prefix put back)."""
        return self.where[self.prefix + key][0], self.prefix + key

    def tensor(self, key: str, count: int | None = None) -> torch.Tensor:
        """The stored tensor, as stored (dtype and shape); with ``count``, its first ``count`` elements only (flat)."""
        path, entry, data = self.where[self.prefix + key]
        begin, end = entry["data_offsets"]
        dtype = _DTYPES[entry["dtype"]]
        if count is not None:
            end = min(end, begin + count * dtype.itemsize)
        raw = torch.empty(end - begin, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(data + begin)
            if f.readinto(memoryview(raw.numpy())) != end - begin:
                raise NotLazy(f"{path}: {key} is cut short")
        return raw.view(dtype) if count is not None else raw.view(dtype).reshape(entry["shape"])


@dataclass
class _Binding:
    """One tensor of a module, bound while the module that reads it runs."""

    owner: nn.Module
    name: str
    is_parameter: bool
    checkpoint: _Checkpoint
    key: str
    placeholder: torch.Tensor  # the meta tensor of our shape and dtype, put back after

    @property
    def nbytes(self) -> int:
        return self.placeholder.numel() * self.placeholder.element_size()

    def bind(self) -> None:
        value = self.checkpoint.tensor(self.key).to(self.placeholder.dtype).reshape(self.placeholder.shape)
        if self.is_parameter:
            self.owner._parameters[self.name] = nn.Parameter(value, requires_grad=False)
        else:
            self.owner._buffers[self.name] = value

    def release(self) -> None:
        (self.owner._parameters if self.is_parameter else self.owner._buffers)[self.name] = self.placeholder


class LazyWeights:
    """The bindings of a lazily built module, grouped by the module that runs while they are bound.

    A tensor is bound while its own module runs; one its module never runs for
    (read by an ancestor, as the text encoder reads its position embedding)
    while the nearest ancestor that runs does (``check_dry_run`` finds which).
    ``bound_bytes`` is what is bound now; ``peak_bytes`` the most bound at once.
    """

    def __init__(self, module: nn.Module, sources: dict[int, _Source]):
        self.module = module
        self.bindings: dict[nn.Module, list[_Binding]] = {}
        self.bound_bytes = self.peak_bytes = 0
        self._hooks: list = []
        checkpoints: dict[int, _Checkpoint] = {}
        names = {m: n for n, m in module.named_modules()}
        for owner in module.modules():
            for is_parameter, table in ((True, owner._parameters), (False, owner._buffers)):
                for name, tensor in table.items():
                    if tensor is None:
                        continue
                    source = sources.get(id(tensor))
                    if source is None:
                        if tensor.is_meta:
                            raise NotLazy(f"{_path(names[owner], name)} is not a checkpoint tensor as loaded (changed after loading)")
                        continue  # a value of our own (a causal mask, frequencies): not the checkpoint's
                    ref = source.reference
                    if id(ref) not in checkpoints:
                        checkpoints[id(ref)] = _Checkpoint(ref)
                    checkpoint = checkpoints[id(ref)]
                    self._check_fits(checkpoint, source, tensor, _path(names[owner], name))
                    placeholder = tensor if tensor.is_meta else tensor.to("meta")
                    binding = _Binding(owner, name, is_parameter, checkpoint, source.key, placeholder)
                    binding.release()
                    self.bindings.setdefault(owner, []).append(binding)

    @staticmethod
    def _check_fits(checkpoint: _Checkpoint, source: _Source, tensor: torch.Tensor, where: str) -> None:
        stored = checkpoint.shape(source.key)
        if stored != source.shape:
            raise NotLazy(f"{where}: the checkpoint's {source.key} is {stored}, the model's {source.shape}")
        if stored != tuple(tensor.shape) and not (len(stored) == 2 and tuple(tensor.shape) == (*stored, 1, 1)):
            raise NotLazy(f"{where}: the checkpoint's {source.key} {stored} does not fit {tuple(tensor.shape)}")
        if checkpoint.dtype(source.key) not in _DTYPES:
            raise NotLazy(f"{where}: the checkpoint's {source.key} is {checkpoint.dtype(source.key)}, not floating point")

    def check_dry_run(self, inputs: list) -> None:
        """Run the module once on the meta device (no value, no memory) to see which modules run; move each
        binding of a module that does not run to its nearest ancestor that does."""
        ran: set[nn.Module] = set()
        hooks = [m.register_forward_pre_hook(lambda m, args: ran.add(m)) for m in self.module.modules()]
        saved = []
        for owner in self.module.modules():
            for table in (owner._parameters, owner._buffers):
                for name, tensor in table.items():
                    if tensor is not None and not tensor.is_meta:
                        saved.append((table, name, tensor))
                        table[name] = tensor.to("meta")
        try:
            with torch.no_grad():
                self.module(*[torch.empty(s.shape, device="meta") for s in inputs])
        except Exception as e:  # an op the meta device lacks, say: nothing shows the mapping then
            raise NotLazy(f"the module does not run on the meta device ({type(e).__name__}: {e})") from None
        finally:
            for h in hooks:
                h.remove()
            for table, name, tensor in saved:
                table[name] = tensor
        parents = {child: owner for owner in self.module.modules() for child in owner.children()}
        for owner in list(self.bindings):
            runner = owner
            while runner not in ran and runner in parents:
                runner = parents[runner]
            if runner is not owner:
                self.bindings.setdefault(runner, []).extend(self.bindings.pop(owner))

    def _pre(self, module, args) -> None:
        for binding in self.bindings[module]:
            binding.bind()
            self.bound_bytes += binding.nbytes
        self.peak_bytes = max(self.peak_bytes, self.bound_bytes)

    def _post(self, module, args, output) -> None:
        for binding in self.bindings[module]:
            binding.release()
            self.bound_bytes -= binding.nbytes

    def largest_group_bytes(self) -> int:
        """The most weight bytes one module binds for itself."""
        return max((sum(b.nbytes for b in group) for group in self.bindings.values()), default=0)

    @contextlib.contextmanager
    def bound(self):
        """Within: each module's weights are bound while it runs, and dropped after."""
        for owner in self.bindings:
            self._hooks.append(owner.register_forward_pre_hook(self._pre))
            self._hooks.append(owner.register_forward_hook(self._post))
        try:
            yield self.module
        finally:
            for hook in self._hooks:
                hook.remove()
            self._hooks.clear()
            for group in self.bindings.values():
                for binding in group:
                    binding.release()
            self.bound_bytes = 0

    def load_all(self) -> nn.Module:
        """Every weight bound for good (what ``build_component`` gives): for comparisons."""
        for group in self.bindings.values():
            for binding in group:
                binding.bind()
        return self.module


def _path(prefix: str, name: str) -> str:
    """A tensor's state-dict key: its module's path in the root module, then its name."""
    return f"{prefix}.{name}" if prefix else name
