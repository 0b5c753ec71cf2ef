"""The synthetic tokenizer's merges: the incremental trainer gives what recounting every pair gives."""

from collections import Counter

import pytest

from sdbuild.synthetic import CORPUS, TOKENIZER_MERGES, _bytes_to_unicode, _train_merges


def recounted_merges(n_merges: int) -> list[tuple[str, str]]:
    """The reference: after each merge, count every pair of the whole corpus again; ties to the smallest pair."""
    byte_char = _bytes_to_unicode()
    words = Counter()
    for word in CORPUS.read_text().lower().split():
        symbols = [byte_char[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        words[tuple(symbols)] += 1
    merges = []
    while len(merges) < n_merges:
        pairs = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = Counter()
        for symbols, count in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


@pytest.mark.parametrize("n_merges", [0, 1, 37, TOKENIZER_MERGES])
def test_merges_match_recounting(n_merges):
    assert list(_train_merges(n_merges)) == recounted_merges(n_merges)


def test_merges_stop_when_the_corpus_is_one_symbol_per_word():
    everything = recounted_merges(10**6)
    assert len(everything) < 10**6  # the corpus ran out of pairs
    assert list(_train_merges(10**6)) == everything
