"""CLIP's real tokenizer, built from open-clip-torch's shipped BPE file, with no network."""

from __future__ import annotations

import json

from transformers import CLIPTokenizer

from sdbuild.clip_vocab import VOCAB_SIZE, write_clip_vocabulary


def test_clip_tokenizer_gives_apples_ids(tmp_path):
    folder = write_clip_vocabulary(tmp_path / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    # The ids Apple's Swift package's tokenizer tests expect for this prompt.
    ids = tokenizer("a photo of an astronaut riding a horse on mars").input_ids
    assert ids == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]
    vocab = json.loads((folder / "vocab.json").read_text())
    assert len(vocab) == len(tokenizer) == VOCAB_SIZE
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert len((folder / "merges.txt").read_text().splitlines()) == 1 + 48894
