"""LoRAs fused into the weights, and textual-inversion embeddings added, before tracing.

Both act on a diffusers folder in the download entry, so the packages carry
no LoRA or embedding at run time and every stage downstream is unchanged.
LoRAs load through diffusers (kohya/A1111 ``lora_unet_*``/``lora_te*_`` names
with ``alpha``, and the diffusers/PEFT format) and are fused one after the
other at their strengths, so several sum in order.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from sdbuild.cache import input_digest
from sdbuild.checkpoints import load_tensors, tensor_shapes
from sdbuild.errors import SdbuildError

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


class AdapterError(SdbuildError):
    """A LoRA or embedding that cannot be applied to the model."""

    exit_code = 2


def _is_lora_name(name: str) -> bool:
    return name.startswith(("lora_unet_", "lora_te")) or ".lora_" in name or ".lora." in name


def lora_info(path: Path, strength: float, key: str) -> dict:
    """What enters the download key for one LoRA: its content digest and strength (and where it is)."""
    names = list(tensor_shapes(path))
    if not any(_is_lora_name(n) for n in names):
        sample = ", ".join(names[:2]) or "no tensors"
        raise AdapterError(f"{key}.path: {path} holds no LoRA weights (no lora_* tensors; first names: {sample})")
    return {"path": str(path), "content": input_digest(path), "strength": strength}


def embedding_info(path: Path, token: str, key: str) -> dict:
    """What enters the download key for one embedding: its content digest and token."""
    check_token(token, f"{key}.token")
    _embedding_tables(path, key)  # refuse a file that holds no embedding before any work
    return {"path": str(path), "content": input_digest(path), "token": token}


# --- LoRA --------------------------------------------------------------------


def _pipeline(model: Path):
    """The folder's pipeline without VAE or safety checker, in float32 (LoRAs fuse in full precision)."""
    import torch
    from diffusers import DiffusionPipeline

    index = json.loads((model / "model_index.json").read_text())
    skip = {name: None for name in ("vae", "safety_checker", "feature_extractor", "image_encoder") if name in index}
    return DiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, use_safetensors=True, **skip)


def _stored_dtype(folder: Path):
    import torch
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    with safe_open(str(files[0]), "pt") as f:
        first = next(iter(f.keys()))
        return f.get_slice(first).get_dtype() == "F16" and torch.float16 or torch.float32


def check_lora_fits(pipe, state: dict, origin: str) -> None:
    """Every LoRA layer of ``state`` (diffusers names, as ``lora_state_dict`` gives) names a layer of
    the model with matching widths; else one line naming the first that does not fit."""
    for name, tensor in state.items():
        component, _, rest = name.partition(".")
        model = getattr(pipe, component, None)
        if model is None:
            raise AdapterError(f"{origin}: {name}: this model has no {component}")
        for marker in (".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", ".lora_linear_layer.down.", ".lora_linear_layer.up."):
            if marker in rest:
                module_name, side = rest.split(marker)[0], marker
                break
        else:
            continue  # alphas and other bookkeeping
        module_name = _module_name(model, module_name)
        if module_name is None:
            raise AdapterError(f"{origin}: {name}: no layer {rest.split('.lora')[0]} in the model's {component}")
        weight = model.get_submodule(module_name).weight
        down = side in (".lora_A.", ".lora.down.", ".lora_linear_layer.down.")
        want, got = (weight.shape[1], tensor.shape[1]) if down else (weight.shape[0], tensor.shape[0])
        if want != got:
            raise AdapterError(
                f"{origin}: {name}: width {got} does not fit the model's {component} layer ({want}); "
                "is this LoRA for another model family?"
            )


def _module_name(model, name: str) -> str | None:
    """``name`` as a submodule path of ``model``; transformers' CLIPTextModel may lack the ``text_model.`` level."""
    for candidate in (name, name.removeprefix("text_model.")):
        try:
            model.get_submodule(candidate)
            return candidate
        except AttributeError:
            continue
    return None


def fuse_loras(model: Path, loras: list[dict]) -> dict:
    """Fuse ``loras`` (``lora_info`` dicts, in order) into the diffusers folder ``model``, in place.

    Each is loaded, checked against the model, fused at its strength and
    unloaded; the unet and text encoders are saved back in their stored
    dtype. Returns facts for the manifest (fusion seconds).
    """
    import time

    import torch
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    if not loras:
        return {}
    start = time.perf_counter()
    pipe = _pipeline(model)
    for i, lora in enumerate(loras):
        origin = f"model.loras[{i}] {lora['path']}"
        tensors = load_tensors(Path(lora["path"]), ("",))
        try:
            state, _ = pipe.lora_state_dict(dict(tensors))
            # The unet's names as load_lora_weights ends up using them (text encoders' are left as they are).
            unet = convert_unet_state_dict_to_peft({k: v for k, v in state.items() if k.startswith("unet.")})
            state = {**unet, **{k: v for k, v in state.items() if not k.startswith("unet.")}}
        except (ValueError, KeyError) as e:
            raise AdapterError(f"{origin}: diffusers cannot read this LoRA: {str(e).splitlines()[0][:300]}") from None
        check_lora_fits(pipe, state, origin)
        name = f"lora{i}"
        pipe.load_lora_weights(dict(tensors), adapter_name=name)
        components = [c for c in ("unet", *TEXT_ENCODERS) if getattr(pipe, c, None) is not None]
        pipe.fuse_lora(components=components, lora_scale=lora["strength"], adapter_names=[name])
        pipe.unload_lora_weights()
    for component in ("unet", *TEXT_ENCODERS):
        module = getattr(pipe, component, None)
        if module is not None:
            folder = model / component
            dtype = _stored_dtype(folder)
            for f in folder.glob("*.safetensors"):
                f.unlink()
            with torch.no_grad():
                module.to(dtype).save_pretrained(folder, safe_serialization=True)
    return {"lora_fusion_seconds": round(time.perf_counter() - start, 2)}


# --- textual inversion -------------------------------------------------------


def _embedding_tables(path: Path, key: str) -> dict[str, object]:
    """Text encoder → embedding rows [n, width]: ``clip_l``/``clip_g`` (SDXL), or one table (SD 1.x/2.x)."""
    tensors = load_tensors(Path(path), ("",))
    if "clip_l" in tensors or "clip_g" in tensors:
        return {k: v for k, v in (("text_encoder", tensors.get("clip_l")), ("text_encoder_2", tensors.get("clip_g"))) if v is not None}
    if "string_to_param" in tensors or any(k.startswith("string_to_param.") for k in tensors):
        table = tensors.get("string_to_param") or next(v for k, v in tensors.items() if k.startswith("string_to_param."))
    elif "emb_params" in tensors:
        table = tensors["emb_params"]
    elif len(tensors) == 1:  # diffusers' own format: {token: rows}
        table = next(iter(tensors.values()))
    else:
        raise AdapterError(f"{key}.path: {path}: not a textual-inversion embedding (tensors: {', '.join(list(tensors)[:3])})")
    return {"text_encoder": table}


def add_embeddings(model: Path, embeddings: list[dict]) -> dict:
    """Add each embedding's token(s) to the tokenizer(s) and rows to the text encoder(s) of ``model``, in place.

    Each embedding is one vector per text encoder; the tokenizer folders keep ``vocab.json``/``merges.txt`` (the bundle's
    files) with the new tokens appended, so Apple's tokenizer sees them too.
    """
    if not embeddings:
        return {}
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    added = {}
    for i, embedding in enumerate(embeddings):
        key = f"model.embeddings[{i}]"
        tables = _embedding_tables(Path(embedding["path"]), key)
        for component, rows in tables.items():
            folder = model / component
            if not folder.is_dir():
                raise AdapterError(f"{key}: {embedding['path']} has rows for {component}, which this model does not have")
            tokenizer_dir = model / ("tokenizer_2" if component == "text_encoder_2" else "tokenizer")
            cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
            encoder = cls.from_pretrained(folder, use_safetensors=True)
            rows = rows.reshape(-1, rows.shape[-1]).to(torch.float32)
            width = encoder.get_input_embeddings().weight.shape[1]
            if rows.shape[1] != width:
                raise AdapterError(
                    f"{key}: {embedding['path']}: rows are {rows.shape[1]} wide, the model's {component} takes {width}; "
                    "is this embedding for another model family?"
                )
            if rows.shape[0] != 1:
                raise AdapterError(
                    f"{key}: {embedding['path']} has {rows.shape[0]} vectors per token; sdbuild adds one-vector embeddings only "
                    "(Apple's tokenizer gives a prompt word one id)"
                )
            tokens = [embedding["token"]]
            ids = _append_tokens(tokenizer_dir, tokens, key)
            encoder.resize_token_embeddings(max(ids) + 1)
            if encoder.config.eos_token_id == 2:
                # Early CLIP configs' eos id 2 makes transformers pool at the largest id: a new token would win.
                encoder.config.eos_token_id = json.loads((tokenizer_dir / "vocab.json").read_text())["<|endoftext|>"]
            with torch.no_grad():
                table = encoder.get_input_embeddings().weight
                table[ids] = rows.to(table.dtype)
            dtype = _stored_dtype(folder)
            for f in folder.glob("*.safetensors"):
                f.unlink()
            encoder.to(dtype).save_pretrained(folder, safe_serialization=True)
            CLIPTokenizer.from_pretrained(tokenizer_dir)  # the folder still loads
            added.setdefault(component, []).extend(tokens)
    return {"embedding_tokens": added}


def _append_tokens(tokenizer_dir: Path, tokens: list[str], key: str) -> list[int]:
    """Append each token to ``vocab.json`` as a whole word, with the merges that join it.

    The word is first split as CLIP's byte-pair encoding splits it with the
    existing merges; new merges, ranked after all others, then join those
    pieces left to right. So transformers' tokenizer and Apple's Swift one,
    reading the same two files, both give the token one id.
    """
    vocab_file, merges_file = tokenizer_dir / "vocab.json", tokenizer_dir / "merges.txt"
    vocab = json.loads(vocab_file.read_text())
    lines = merges_file.read_text().rstrip("\n").split("\n")
    header, merges = lines[:1], lines[1:]
    ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
    ids = []
    for token in tokens:
        check_token(token, f"{key}.token")
        word = _bpe_word(token)
        if word in vocab:
            raise AdapterError(f"{key}.token: '{token}' is already a word of CLIP's vocabulary; pick another")
        pieces = _bpe(_symbols(token), ranks)
        while len(pieces) > 1:
            joined = pieces[0] + pieces[1]
            ranks[(pieces[0], pieces[1])] = len(merges)
            merges.append(f"{pieces[0]} {pieces[1]}")
            vocab.setdefault(joined, len(vocab))
            pieces = [joined] + pieces[2:]
        ids.append(vocab[word])
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False))
    merges_file.write_text("\n".join(header + merges) + "\n")
    return ids


def check_token(token: str, key: str) -> None:
    """A token must be one lower-case word of letters: CLIP's tokenizers (Apple's too) split at anything else."""
    if not re.fullmatch(r"[^\W\d_]+", token) or token.lower() != token:
        raise AdapterError(
            f"{key}: '{token}': use one lower-case word of letters (e.g. mystyle): "
            "CLIP's tokenizers, Apple's included, split prompts at punctuation, digits and spaces"
        )


def _bpe(symbols: list[str], ranks: dict) -> list[str]:
    """CLIP's byte-pair encoding of one word: merge the best-ranked adjacent pair until none applies."""
    while len(symbols) > 1:
        pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def _symbols(token: str) -> list[str]:
    from sdbuild.synthetic import _bytes_to_unicode

    chars = _bytes_to_unicode()
    symbols = [chars[b] for b in token.encode("utf-8")]
    symbols[-1] += "</w>"
    return symbols


def _bpe_word(token: str) -> str:
    return "".join(_symbols(token))
