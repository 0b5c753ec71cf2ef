"""What Apple's StableDiffusion Swift package does with a bundle, re-stated in Python.

Written from the package's sources (swift/StableDiffusion/pipeline/*.swift,
tokenizer/*.swift in apple/ml-stable-diffusion), not copied: which files its
pipelines look for and in which order, which are required, what it reads from
each model's description, and what it feeds each model. ``walk_sd`` and
``walk_sdxl`` raise ``Drift`` where a real app would fail to load or run the
bundle. docs/swift-package.md lists each expectation with its Swift source.

The Swift package opens compiled models (``.mlmodelc``); on Linux a bundle
keeps ``.mlpackage`` files, which a Mac compiles to the ``.mlmodelc`` of the
same name: ``ext`` says which the walk looks for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

START, END = "<|startoftext|>", "<|endoftext|>"
PROJECTION = "MultilingualTextEncoderProjection"
EMBEDDING = (1, 256, 512)  # NLContextualEmbedding's padded token vectors, MultilingualTextEncoder.encode
SAFETY_IMAGES = (1, 512, 512, 3)  # the placeholder SafetyChecker.isSafe feeds as `images`


class Drift(AssertionError):
    """The bundle differs from what the Swift package expects."""


@dataclass
class Model:
    """A model as ``MLModel.modelDescription`` shows it: input and output shapes by name, in order."""

    path: Path
    inputs: dict[str, tuple[int, ...]]
    outputs: dict[str, tuple[int, ...]]

    def only_input(self) -> tuple[str, tuple[int, ...]]:
        # `inputDescriptionsByName.first!`: a dictionary's first entry is arbitrary, so there must be one.
        if len(self.inputs) != 1:
            raise Drift(f"{self.path.name}: the Swift package feeds its one input by whichever name comes first; it has {list(self.inputs)}")
        return next(iter(self.inputs.items()))

    def only_output(self) -> tuple[str, tuple[int, ...]]:
        # `result.featureNames.first!` / `outputDescriptionsByName.first`: likewise for outputs.
        if len(self.outputs) != 1:
            raise Drift(f"{self.path.name}: the Swift package reads whichever output comes first; it has {list(self.outputs)}")
        return next(iter(self.outputs.items()))

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.inputs:
            raise Drift(f"{self.path.name}: the Swift package reads the input '{name}'; it has {list(self.inputs)}")
        return self.inputs[name]

    def output(self, name: str) -> tuple[int, ...]:
        if name not in self.outputs:
            raise Drift(f"{self.path.name}: the Swift package reads the output '{name}'; it has {list(self.outputs)}")
        return self.outputs[name]


def describe(path: Path) -> Model:
    """Input and output shapes of a package, from its spec."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))

    def shapes(features):
        return {f.name: tuple(int(d) for d in f.type.multiArrayType.shape) for f in features}

    return Model(Path(path), shapes(spec.description.input), shapes(spec.description.output))


def _expect(what: str, got, want) -> None:
    if tuple(got) != tuple(want):
        raise Drift(f"{what}: the Swift package feeds or reads {list(want)}; the bundle has {list(got)}")


# --- tokenizer: BPETokenizer+Reading.swift, BPETokenizer.swift ---------------------------------


def read_vocabulary(path: Path) -> dict[str, int]:
    """vocab.json as ``JSONDecoder().decode([String: Int].self)`` takes it: one object, string keys, int values."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in data.values()):
        raise Drift(f"{path}: the Swift tokenizer decodes a JSON object of token -> integer id")
    return data


def read_merges(path: Path) -> dict[tuple[str, str], int]:
    """merges.txt as the Swift reader takes it: per '\\n' line, '#…' and empty lines skipped, else exactly two
    tokens split on ' '; a pair's rank is its line number counted from 0 (skipped lines count)."""
    merges = {}
    lines = Path(path).read_bytes().split(b"\n")
    for index, line in enumerate(lines[:-1]):  # bytes after the last newline are never parsed
        if not line or line.startswith(b"#"):
            continue
        pair = [p for p in line.split(b" ") if p]
        if len(pair) != 2:
            raise Drift(f"{path}:{index + 1}: the Swift tokenizer needs two tokens per merges line, got {line!r}")
        merges[(pair[0].decode(), pair[1].decode())] = index
    return merges


@dataclass
class SwiftBPE:
    """The Swift package's CLIP tokenizer: lower-cased, split on spaces, greedy lowest-rank merges."""

    merges: dict[tuple[str, str], int]
    vocabulary: dict[str, int]
    pad: str = END  # "!" for SDXL's second text encoder

    def tokenize(self, text: str, min_count: int | None = None) -> list[int]:
        tokens = [START]
        for word in text.strip().lower().split(" "):
            if word:
                tokens += self._word(word)
        tokens.append(END)
        if min_count is not None and min_count > len(tokens):
            tokens += [self.pad] * (min_count - len(tokens))
        unknown = self.vocabulary.get(END, 0)
        return [self.vocabulary.get(t, unknown) for t in tokens]

    def _word(self, word: str) -> list[str]:
        parts = list(word)
        parts[-1] += "</w>"
        while True:
            ranked = [(self.merges[p], p) for p in zip(parts, parts[1:]) if p in self.merges]
            if not ranked:
                return parts
            first, second = min(ranked)[1]
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged


def read_tokenizer(resources: Path, pad: str = END) -> SwiftBPE:
    vocab, merges = Path(resources) / "vocab.json", Path(resources) / "merges.txt"
    for f in (vocab, merges):
        if not f.is_file():
            raise Drift(f"{f}: missing; BPETokenizer(mergesAt:vocabularyAt:) reads it")
    if not merges.read_bytes().startswith(b"#"):
        # Swift skips '#' lines; the CLIPTokenizer of transformers 4.x (Apple's Python pipeline pins 4.44.2)
        # drops the first line whatever it holds: without the header the two would rank merges differently.
        raise Drift(f"{merges}: the first line must be the '#version' header, or Swift and transformers 4.x read different merges")
    vocabulary = read_vocabulary(vocab)
    for token in (START, END, pad):
        if token not in vocabulary:
            raise Drift(f"{vocab}: no '{token}', which the Swift tokenizer places in every sequence")
    return SwiftBPE(read_merges(merges), vocabulary, pad)


# --- the SD pipeline: StableDiffusionPipeline+Resources.swift, StableDiffusionPipeline.swift ----------


@dataclass
class Loaded:
    """What a pipeline's init picked, and the facts generateImages derives from model descriptions."""

    models: dict[str, list[Path]] = field(default_factory=dict)
    latent_shape: tuple[int, ...] = ()  # unet `sample`, batch set to 1: the latents drawn
    unet_batch: int = 0
    sequence_length: int = 0  # tokens in encoder_hidden_states
    hidden_width: int = 0


def _find(resources: Path, name: str, ext: str) -> Path | None:
    path = Path(resources) / f"{name}{ext}"
    return path if path.exists() else None


def _required(resources: Path, name: str, ext: str, why: str) -> Path:
    path = _find(resources, name, ext)
    if path is None:
        raise Drift(f"{Path(resources) / (name + ext)}: missing; {why}")
    return path


def _unet_files(resources: Path, base: str, ext: str) -> list[Path]:
    """Both chunks when both exist (checked first), else the whole model (required)."""
    one, two = _find(resources, f"{base}Chunk1", ext), _find(resources, f"{base}Chunk2", ext)
    if one and two:
        return [one, two]
    return [_required(resources, base, ext, f"the pipeline opens {base} when {base}Chunk1 and {base}Chunk2 are not both there")]


def _run_unet_chain(models: list[Model], feeds: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """``Array<ManagedMLModel>.predictions``: each part gets the previous part's outputs merged over the
    original feeds; every input a part declares must be among them. Returns the last part's one output."""
    available = dict(feeds)
    for i, model in enumerate(models):
        for name, shape in model.inputs.items():
            if name not in available:
                raise Drift(f"{model.path.name}: input '{name}' is neither fed by the Swift package nor an output of the part before")
            _expect(f"{model.path.name} {name}", shape, available[name])
        if i + 1 < len(models):
            available = {**feeds, **model.outputs}
    return models[-1].only_output()[1]


def walk_sd(
    resources: Path,
    ext: str = ".mlpackage",
    controlnets: tuple[str, ...] = (),
    multilingual: bool = False,
    disable_safety: bool = False,
    guidance: bool = True,
) -> Loaded:
    """Load ``resources`` as ``StableDiffusionPipeline(resourcesAt:controlNet:…)`` does and check each
    model against what ``generateImages`` feeds it and reads from it.

    ``controlnets``: the names an app passes (``controlnet/<Name>``);
    ``multilingual``: ``useMultilingualTextEncoder``; ``guidance``: a guidance scale >= 1.
    """
    resources = Path(resources)
    out = Loaded()
    # Text encoding: the system embedding and the projection, or the BPE tokenizer and TextEncoder.
    if multilingual:
        projection = describe(_required(resources, PROJECTION, ext, "useMultilingualTextEncoder opens it"))
        _, embedding = projection.only_input()
        _expect(f"{projection.path.name} input", embedding, EMBEDDING)
        _, states = projection.only_output()
        if len(states) != 4 or states[0] != 1 or states[2] != 1:
            raise Drift(f"{projection.path.name}: its output is used as encoder_hidden_states [1, C, 1, S]; it gives {list(states)}")
        out.models["multilingual_projection"] = [projection.path]
        out.hidden_width, out.sequence_length = states[1], states[3]
    else:
        read_tokenizer(resources)
        encoder = describe(_required(resources, "TextEncoder", ext, "the pipeline opens it (required)"))
        _, ids = encoder.only_input()
        if len(ids) != 2 or ids[0] != 1:
            raise Drift(f"{encoder.path.name}: token ids are fed as [1, S]; its input is {list(ids)}")
        hidden = encoder.output("last_hidden_state")
        _expect(f"{encoder.path.name} last_hidden_state", hidden[:2], (1, ids[-1]))
        out.models["text_encoder"] = [encoder.path]
        out.sequence_length, out.hidden_width = ids[-1], hidden[2]

    # ControlNets: controlnet/<Name>, each required once named; then the controlled unet.
    nets = [describe(_required(resources / "controlnet", name, ext, "the app named this ControlNet")) for name in controlnets]
    base = "ControlledUnet" if nets else "Unet"
    unet = [describe(p) for p in _unet_files(resources, base, ext)]
    out.models["unet"] = [m.path for m in unet]
    sample = unet[0].shape("sample")
    out.latent_shape = (1, *sample[1:])
    out.unet_batch = sample[0]
    # With guidance: one call at batch 2 when the unet takes it, else two calls at batch 1.
    batch = 2 if (guidance and sample[0] >= 2) else 1
    if guidance and sample[0] not in (1, 2):
        raise Drift(f"{unet[0].path.name}: sample batch {sample[0]}; the Swift package runs batch 2, or 1 twice")
    feeds = {
        "sample": (batch, *sample[1:]),
        "timestep": (2,) if batch == 2 else (1,),
        "encoder_hidden_states": (batch, out.hidden_width, 1, out.sequence_length),
    }
    residuals: dict[str, tuple[int, ...]] = {}
    for net in nets:
        out.models.setdefault("controlnet", []).append(net.path)
        # ControlNet.execute: always a [2] timestep, and the unet's latents and hidden states.
        net_feeds = {**feeds, "timestep": (2,), "controlnet_cond": net.shape("controlnet_cond")}
        for name, shape in net.inputs.items():
            if name not in net_feeds:
                raise Drift(f"{net.path.name}: input '{name}' is not fed by ControlNet.execute")
            _expect(f"{net.path.name} {name}", shape, net_feeds[name])
        if residuals and set(residuals) != set(net.outputs):
            raise Drift(f"{net.path.name}: its outputs are added by name to the first ControlNet's; they differ")
        residuals = dict(net.outputs)
    if nets:
        unused = set(residuals) - set().union(*(m.inputs for m in unet))
        if unused:
            raise Drift(f"{base}: takes none of the ControlNet outputs {sorted(unused)}")
    noise = _run_unet_chain(unet, {**feeds, **residuals})
    _expect(f"{unet[-1].path.name} output", noise, feeds["sample"])

    # Decoder (required): one input, the latents; one output, the image.
    decoder = describe(_required(resources, "VAEDecoder", ext, "the pipeline opens it (required)"))
    _, z = decoder.only_input()
    _expect(f"{decoder.path.name} input", z, out.latent_shape)
    _, image = decoder.only_output()
    h, w = out.latent_shape[2:]
    if len(image) != 4 or image[:2] != (1, 3) or image[2] % h or image[3] % w or image[2] // h != image[3] // w:
        raise Drift(f"{decoder.path.name}: gives {list(image)}; CGImage.fromShapedArray takes [1, 3, H, W]")
    out.models["vae_decoder"] = [decoder.path]

    # Optional: the image encoder (image-to-image) and the safety checker.
    if found := _find(resources, "VAEEncoder", ext):
        encoder = describe(found)
        _, x = encoder.only_input()
        _expect(f"{encoder.path.name} input", x, image)
        _, latent = encoder.only_output()
        _expect(f"{encoder.path.name} output (mean, log-variance)", latent, (1, 8, h, w))
        out.models["vae_encoder"] = [encoder.path]
    if not disable_safety and (found := _find(resources, "SafetyChecker", ext)):
        checker = describe(found)
        clip = checker.shape("clip_input")
        fed = {"clip_input": (1, 3, clip[2], clip[3]), "adjustment": (1,), "images": SAFETY_IMAGES}
        if set(checker.inputs) != set(fed):
            raise Drift(f"{checker.path.name}: SafetyChecker.isSafe feeds {sorted(fed)}; it takes {sorted(checker.inputs)}")
        for name, shape in fed.items():
            _expect(f"{checker.path.name} {name}", checker.inputs[name], shape)
        checker.output("has_nsfw_concepts")
        out.models["safety_checker"] = [checker.path]
    return out


# --- the SDXL pipeline: StableDiffusionXL+Resources.swift, StableDiffusionXLPipeline.swift ---------


def walk_sdxl(resources: Path, ext: str = ".mlpackage") -> Loaded:
    """Load ``resources`` as ``StableDiffusionXLPipeline(resourcesAt:)`` does and check each model."""
    resources = Path(resources)
    out = Loaded()
    read_tokenizer(resources)
    read_tokenizer(resources, pad="!")  # the second text encoder's tokenizer pads with "!"
    encoders = {}
    for key, name, required in (("text_encoder", "TextEncoder", False), ("text_encoder_2", "TextEncoder2", True)):
        found = _required(resources, name, ext, "the SDXL pipeline opens it (required)") if required else _find(resources, name, ext)
        if found:
            model = describe(found)
            _, ids = model.only_input()
            hidden = model.output("hidden_embeds")
            _expect(f"{name} hidden_embeds", hidden[:2], (1, ids[-1]))
            encoders[key] = (ids[-1], hidden[2], model.output("pooled_outputs"))
            out.models[key] = [model.path]
    sequence, width2, pooled = encoders["text_encoder_2"]
    for base, key in (("Unet", "unet"), ("UnetRefiner", "unet_refiner")):
        if key == "unet_refiner" and not (_find(resources, base, ext) or _find(resources, f"{base}Chunk1", ext)):
            continue  # the refiner is optional
        unet = [describe(p) for p in _unet_files(resources, base, ext)]
        out.models[key] = [m.path for m in unet]
        sample = unet[0].shape("sample")
        time_ids = unet[0].shape("time_ids")
        refiner = time_ids[-1] == 5  # how generateImages tells a refiner
        if refiner:
            width = width2
        elif "text_encoder" in encoders:
            width = encoders["text_encoder"][1] + width2
        else:
            raise Drift(f"{base}: a base unet needs TextEncoder (startingText2ImgWithoutTextEncoder)")
        feeds = {
            "sample": (2, *sample[1:]),  # SDXL always runs batch 2: timestep is always [2]
            "timestep": (2,),
            "encoder_hidden_states": (2, width, 1, sequence),
            "text_embeds": (2, pooled[-1]),
            # [2, 6] (refiner: [2, 5]); a base unet may take the two rows flat, [12].
            "time_ids": (2, time_ids[-1]) if (refiner or len(time_ids) > 1) else (12,),
        }
        noise = _run_unet_chain(unet, feeds)
        _expect(f"{unet[-1].path.name} output", noise, feeds["sample"])
        if key == "unet":
            out.latent_shape, out.unet_batch = (1, *sample[1:]), sample[0]
            out.sequence_length, out.hidden_width = sequence, width
    decoder = describe(_required(resources, "VAEDecoder", ext, "the SDXL pipeline opens it (required)"))
    _, z = decoder.only_input()
    _expect(f"{decoder.path.name} input", z, out.latent_shape)
    decoder.only_output()
    out.models["vae_decoder"] = [decoder.path]
    if found := _find(resources, "VAEEncoder", ext):
        encoder = describe(found)
        encoder.only_input()
        encoder.only_output()
        out.models["vae_encoder"] = [encoder.path]
    return out
