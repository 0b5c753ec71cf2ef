"""CLIP's own tokenizer, built from the BPE vocabulary a well-kept package ships.

Single-file checkpoints carry no tokenizer; every Stable Diffusion family
uses CLIP's 49408-id byte-pair vocabulary. open-clip-torch ships it as
``open_clip/bpe_simple_vocab_16e6.txt.gz``; we read that file through the
installed distribution's metadata without importing the package (importing
it would import torchvision). No network.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from sdbuild.errors import SdbuildError
from sdbuild.synthetic import BOS, EOS, MAX_TOKENS, _bytes_to_unicode

VOCAB_DISTRIBUTION = "open_clip_torch"
VOCAB_FILE = "open_clip/bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
# CLIP keeps the first 49152 - 256 - 2 merges of the file (its first line is a header).
N_MERGES = 49152 - 256 - 2


def _bpe_file() -> Path:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(VOCAB_DISTRIBUTION)
    except PackageNotFoundError:
        raise SdbuildError(
            "CLIP's tokenizer vocabulary comes from open-clip-torch, which is not installed: "
            "run `pip install --no-deps open-clip-torch` (make install does)"
        ) from None
    path = Path(dist.locate_file(VOCAB_FILE))
    if not path.is_file():
        raise SdbuildError(f"{path}: missing from the installed open-clip-torch; reinstall it")
    return path


def clip_merges() -> list[tuple[str, str]]:
    """CLIP's byte-pair merges, in rank order (48894 of them)."""
    lines = gzip.decompress(_bpe_file().read_bytes()).decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]


def write_clip_vocabulary(dest: Path, pad_token: str = EOS) -> Path:
    """Write CLIP's ``vocab.json``, ``merges.txt`` and tokenizer configs into ``dest`` (created).

    The vocabulary is laid out as CLIP's: 256 byte characters, the same with
    ``</w>``, one entry per merge, then the start and end tokens (ids 49406,
    49407). ``pad_token``: SD 1.x pads with the end token, SD 2.x and SDXL's
    second tokenizer with ``!``. Returns ``dest``.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    merges = clip_merges()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    if len(tokens) != VOCAB_SIZE:
        raise SdbuildError(f"{_bpe_file()}: gives {len(tokens)} tokens, not CLIP's {VOCAB_SIZE}")
    (dest / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (dest / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (dest / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_TOKENS, "do_lower_case": True, **specials}
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return dest
