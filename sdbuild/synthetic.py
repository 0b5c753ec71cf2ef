"""Tiny Stable Diffusion models made on the fly, for tests and the demo.

Each is a small diffusers/transformers configuration with fixed-seed random
weights and a CLIP-format byte-pair tokenizer that we train ourselves on a
small text shipped in the package, saved in the ordinary diffusers folder
layout so the same loading code serves hub models, local folders and these.
Same name and seed give byte-identical files.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path

from sdbuild.errors import RecipeError

SYNTHETIC_PREFIX = "synthetic:"
CORPUS = Path(__file__).parent / "data" / "corpus.txt"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TOKENIZER_MERGES = 400
MAX_TOKENS = 77
# The tiny safety checker's thresholds, first and last (see _safety_checker).
CONCEPT_THRESHOLDS = (0.21, 0.37)
SPECIAL_THRESHOLDS = (0.48, 0.52)


def synthetic_names() -> list[str]:
    return sorted(_BUILDERS)


def is_synthetic(version: str) -> bool:
    return version.startswith(SYNTHETIC_PREFIX)


def make_synthetic(version: str, dest: Path, seed: int = 0) -> Path:
    """Write the synthetic model ``version`` (e.g. ``synthetic:tiny-sd``) to ``dest``.

    ``dest`` must not exist; it is written through a temporary sibling folder.
    Returns ``dest``.
    """
    name = version.removeprefix(SYNTHETIC_PREFIX)
    if name not in _BUILDERS:
        raise RecipeError(
            f"unknown synthetic model '{version}': choose one of "
            + ", ".join(SYNTHETIC_PREFIX + n for n in synthetic_names())
        )
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
    try:
        _BUILDERS[name](tmp, seed)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest


# --- tokenizer ---------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte → printable character map CLIP and GPT-2 use."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


@functools.lru_cache(maxsize=None)
def _train_merges(n_merges: int) -> tuple[tuple[str, str], ...]:
    """Byte-pair merges learned from the shipped corpus, deterministically.

    The tokenizers library breaks ties between equally frequent pairs in hash
    order, which changes from run to run; here ties go to the smallest pair,
    so the same corpus always gives the same merges. Each merge updates the
    pair counts of the words holding the merged pair only (a heap keeps the
    most frequent pair on top), not the whole corpus again: the same merges
    as recounting everything after each one, in a fraction of the time
    (``tests/test_synthetic_tokenizer.py`` holds the recounting version).
    """
    import heapq
    from collections import Counter, defaultdict

    byte_char = _bytes_to_unicode()
    counts = Counter()
    for word in CORPUS.read_text().lower().split():
        symbols = [byte_char[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        counts[tuple(symbols)] += 1
    words = [list(w) for w in counts]
    freq = list(counts.values())
    pairs = Counter()
    holders = defaultdict(set)  # pair -> indices of the words it occurs in (possibly no longer)
    for i, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pairs[pair] += freq[i]
            holders[pair].add(i)
    heap = [(-n, pair) for pair, n in pairs.items()]
    heapq.heapify(heap)
    merges = []
    while len(merges) < n_merges and heap:
        n, best = heapq.heappop(heap)
        if pairs.get(best, 0) != -n:
            continue  # a stale entry: the pair's count has changed since it was pushed
        merges.append(best)
        changed = set()
        for i in sorted(holders.pop(best)):
            symbols = words[i]
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] -= freq[i]
                changed.add(pair)
            out, j = [], 0
            while j < len(symbols):
                if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == best:
                    out.append(symbols[j] + symbols[j + 1])
                    j += 2
                else:
                    out.append(symbols[j])
                    j += 1
            words[i] = out
            for pair in zip(out, out[1:]):
                pairs[pair] += freq[i]
                holders[pair].add(i)
                changed.add(pair)
        for pair in changed:
            if pairs[pair] > 0:
                heapq.heappush(heap, (-pairs[pair], pair))
            else:
                del pairs[pair]
    return tuple(merges)


def write_clip_tokenizer(dest: Path, n_merges: int = TOKENIZER_MERGES, pad_token: str = EOS) -> int:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer configs into ``dest``.

    The vocabulary is laid out as CLIP's is: 256 byte characters, the same
    with ``</w>``, one entry per merge, then the two special tokens.
    Returns the vocabulary size.
    """
    dest.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    merges = _train_merges(n_merges)
    tokens = chars + [c + "</w>" for c in chars]
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    (dest / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (dest / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (dest / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}, indent=2)
    )
    (dest / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": MAX_TOKENS,
                "bos_token": BOS,
                "eos_token": EOS,
                "unk_token": EOS,
                "pad_token": pad_token,
                "do_lower_case": True,
            },
            indent=2,
        )
    )
    return len(vocab)


# --- model families ----------------------------------------------------------


def _seeded(seed: int, build):
    import torch

    torch.manual_seed(seed)
    return build()


def _vae(seed: int, scaling_factor: float, force_upcast: bool):
    from diffusers import AutoencoderKL

    # Four blocks so the latent is image / 8, as in every real Stable Diffusion VAE.
    return _seeded(
        seed,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 32, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=scaling_factor,
            force_upcast=force_upcast,
        ),
    )


def _clip_text(seed: int, vocab_size: int, hidden: int, layers: int, projection_dim: int | None = None, act="quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        hidden_act=act,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        projection_dim=projection_dim or hidden,
    )
    cls = CLIPTextModelWithProjection if projection_dim else CLIPTextModel
    return _seeded(seed, lambda: cls(config))


def _scheduler():
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )


def _tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    vocab_size = write_clip_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(folder), vocab_size


def _build_tiny_sd(dest: Path, seed: int) -> None:
    """SD 1.x-shaped: one CLIP text encoder, a two-level unet, a four-block VAE, a safety checker."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer, vocab_size = _tokenizer(Path(tok_dir))
        text_encoder = _clip_text(seed + 1, vocab_size, hidden=32, layers=2)
        unet = _seeded(
            seed + 2,
            lambda: UNet2DConditionModel(
                sample_size=8,
                in_channels=4,
                out_channels=4,
                layers_per_block=1,
                block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32,
                attention_head_dim=2,
                norm_num_groups=8,
            ),
        )
        pipe = StableDiffusionPipeline(
            vae=_vae(seed + 3, 0.18215, False),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(dest, safe_serialization=True)
    _write_tokenizer_files(dest / "tokenizer")
    # Beside the pipeline, not in model_index.json (which keeps safety_checker: null): with random
    # weights it flags most of tiny-sd's own images, and diffusers pipelines loaded from tiny-sd (the
    # image tests' references) would black them out. sdbuild reads the folder itself when asked.
    _safety_checker(seed + 7).save_pretrained(dest / "safety_checker")
    _write_feature_extractor(dest / "feature_extractor")


def _safety_checker(seed: int):
    """A StableDiffusionSafetyChecker: a two-layer, 32-wide CLIP vision tower on 224×224 in 32-pixel patches.

    The vision tower's random weights have three times transformers' default
    spread (``initializer_factor``): at the default, every input gives almost
    the same embedding (pairwise cosine 0.99), so every input would be
    flagged alike. The 17 concept and 3 special-care embeddings are seeded
    normal draws; the thresholds are set so that, for the default seed, about
    half of standard normal ``clip_input`` draws are flagged and a tenth hit a
    special-care concept (with ``adjustment`` 0), so tests find flagged and
    unflagged inputs.
    """
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    config = CLIPConfig(
        # The checker uses only the vision tower; CLIPConfig wants a text config too: a small one.
        text_config=dict(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            bos_token_id=62, eos_token_id=63, pad_token_id=63,
        ),  # fmt: skip
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=224, patch_size=32, initializer_factor=3.0,
        ),  # fmt: skip
        projection_dim=32,
    )
    checker = _seeded(seed, lambda: StableDiffusionSafetyChecker(config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        checker.concept_embeds.normal_(generator=generator)
        checker.special_care_embeds.normal_(generator=generator)
        # Distinct thresholds, so a test would see concepts or weights taken in the wrong order.
        checker.concept_embeds_weights.copy_(torch.linspace(CONCEPT_THRESHOLDS[0], CONCEPT_THRESHOLDS[1], 17))
        checker.special_care_embeds_weights.copy_(torch.linspace(SPECIAL_THRESHOLDS[0], SPECIAL_THRESHOLDS[1], 3))
    return checker.eval()


def _write_feature_extractor(folder: Path) -> None:
    """CLIP's image preprocessing config, as Stable Diffusion checkpoints ship it (written by us: same bytes always)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "crop_size": {"height": 224, "width": 224},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": 224},
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _tiny_sdxl_unet(seed: int, cross_attention_dim: int, time_ids: int):
    """The tiny SDXL-shaped unet: text_time conditioning on ``time_ids`` ids (6 base, 5 refiner) and a 32-wide pooled embedding."""
    from diffusers import UNet2DConditionModel

    time_embed_dim = 8
    return _seeded(
        seed,
        lambda: UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=32 + time_ids * time_embed_dim,
            norm_num_groups=8,
        ),
    )


def _sdxl_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )


def _build_tiny_sdxl(dest: Path, seed: int) -> None:
    """SDXL-shaped: two text encoders (the second with projection), text_time conditioning."""
    from diffusers import StableDiffusionXLPipeline

    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer, vocab_size = _tokenizer(Path(tok_dir))
        text_encoder = _clip_text(seed + 1, vocab_size, hidden=32, layers=2)
        text_encoder_2 = _clip_text(seed + 4, vocab_size, hidden=32, layers=2, projection_dim=32, act="gelu")
        unet = _tiny_sdxl_unet(seed + 2, cross_attention_dim=64, time_ids=6)
        scheduler = _sdxl_scheduler()
        pipe = StableDiffusionXLPipeline(
            vae=_vae(seed + 3, 0.13025, True),
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=scheduler,
        )
        pipe.save_pretrained(dest, safe_serialization=True)
    _write_tokenizer_files(dest / "tokenizer")
    _write_tokenizer_files(dest / "tokenizer_2")


def _build_tiny_sdxl_refiner(dest: Path, seed: int) -> None:
    """An SDXL refiner for ``tiny-sdxl``: its second text encoder and VAE (same seeds, same weights),
    a unet conditioned on that encoder alone and on 5 time ids (the aesthetic score last).

    As the released refiner: no first text encoder or tokenizer, ``requires_aesthetics_score``.
    """
    from diffusers import StableDiffusionXLImg2ImgPipeline

    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer, vocab_size = _tokenizer(Path(tok_dir))
        text_encoder_2 = _clip_text(seed + 4, vocab_size, hidden=32, layers=2, projection_dim=32, act="gelu")
        unet = _tiny_sdxl_unet(seed + 8, cross_attention_dim=32, time_ids=5)  # text_encoder_2's width alone
        scheduler = _sdxl_scheduler()
        pipe = StableDiffusionXLImg2ImgPipeline(
            vae=_vae(seed + 3, 0.13025, True),
            text_encoder=None,
            text_encoder_2=text_encoder_2,
            tokenizer=None,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=scheduler,
            requires_aesthetics_score=True,
        )
        pipe.save_pretrained(dest, safe_serialization=True)
    _write_tokenizer_files(dest / "tokenizer_2")


def liven_controlnet(controlnet, seed: int):
    """Give a freshly built diffusers ``ControlNetModel`` weights whose every path carries signal.

    diffusers zero-initializes the zero convolutions (the conditioning
    embedding's last one, one per skip, the mid block's), so an untrained
    ControlNet emits zeros; and with PyTorch's default initialization the
    control image fades through the conditioning embedding's eight
    convolutions to almost nothing, so a test that swapped or flipped the image
    would still pass. Here the zero convolutions get PyTorch's default
    initialization, and the conditioning embedding's convolutions a normal
    one with variance 3 / fan-in (no bias), which keeps activations at about
    unit scale through SiLU. Returns ``controlnet``.
    """
    import torch
    from torch import nn

    generator = torch.Generator().manual_seed(seed)
    embedding = controlnet.controlnet_cond_embedding
    with torch.no_grad():
        for conv in [embedding.conv_in, *embedding.blocks, embedding.conv_out]:
            fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
            conv.weight.normal_(0.0, (3.0 / fan_in) ** 0.5, generator=generator)
            conv.bias.zero_()
    # reset_parameters draws from the global generator: seed it without disturbing the caller's stream.
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            nn.Conv2d.reset_parameters(conv)
    return controlnet


def _build_tiny_controlnet(dest: Path, seed: int) -> None:
    """A ControlNet for ``tiny-sd``'s unet (same blocks, widths and text width), as a plain ControlNet folder.

    Weights as ``liven_controlnet`` sets them. Another seed gives another
    ControlNet that fits the same unet, for tests of several at once.
    """
    from diffusers import ControlNetModel

    controlnet = _seeded(
        seed + 5,
        lambda: ControlNetModel(
            in_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=2,
            norm_num_groups=8,
            # Three stride-2 levels: the control image is at pixel size, 8× the latent.
            conditioning_embedding_out_channels=(8, 16, 16, 32),
        ),
    )
    liven_controlnet(controlnet, seed + 6).save_pretrained(dest, safe_serialization=True)


def _write_tokenizer_files(folder: Path) -> None:
    """Rewrite the tokenizer files from our own deterministic writer.

    save_pretrained may add files (tokenizer.json) whose bytes depend on the
    library version; keeping only ours makes the folder a pure function of the seed.
    """
    for f in folder.iterdir():
        f.unlink()
    write_clip_tokenizer(folder)


_BUILDERS = {
    "tiny-sd": _build_tiny_sd,
    "tiny-sdxl": _build_tiny_sdxl,
    "tiny-sdxl-refiner": _build_tiny_sdxl_refiner,
    "tiny-controlnet": _build_tiny_controlnet,
}
