"""The pre-analysis replays what a measurement cannot change, and measures exactly what the plain forward measures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdbuild.compress import analysis
from sdbuild.compress import analysis as analysis_module
from tests.compress.conftest import analyze_tiny_unet, tiny_unet


def _model(checkpoint, inputs, replay: bool) -> analysis._Model:
    torch.set_num_threads(1)  # the same kernels on both sides: results compared bit for bit
    tensors = [{k: torch.from_numpy(v) for k, v in x.items()} for x in inputs]
    return analysis._Model(tiny_unet(checkpoint).module, tensors, replay=replay)


@pytest.fixture(scope="module")
def models(tiny_sd_checkpoint, analysis_inputs):
    previous = torch.get_num_threads()
    try:
        yield _model(tiny_sd_checkpoint, analysis_inputs, False), _model(tiny_sd_checkpoint, analysis_inputs, True)
    finally:
        torch.set_num_threads(previous)


def test_every_layer_and_mixed_recipes_measure_the_same_with_the_replay(models):
    plain, fast = models
    assert not fast.replay.broken and fast.replay.kept[0]
    names = [layer.name for layer in plain.layers]
    rng = np.random.default_rng(0)
    spread = [names[i] for i in np.unique(np.linspace(0, len(names) - 1, 12).round().astype(int))]
    recipes = [{}] + [{name: 2} for name in spread]
    recipes += [{n: int(rng.choice((1, 4, 8))) for n in rng.choice(names, size=5, replace=False)} for _ in range(4)]
    for recipe in recipes:
        assert fast.psnr_with(fast.palettized(recipe)) == plain.psnr_with(plain.palettized(recipe)), recipe
    assert not fast.replay.broken


def test_the_replay_skips_the_calls_before_the_first_swapped_layer(models):
    _, fast = models
    replay = fast.replay
    last = max(fast.layers, key=lambda layer: layer.order).name
    ran = []
    originals = {name: module.forward for name, module in replay.modules.items()}
    for name, module in replay.modules.items():
        module.forward = lambda *a, name=name, **k: (ran.append(name), originals[name](*a, **k))[1]
    try:
        fast.psnr_with(fast.palettized({last: 4}))
    finally:
        for module in replay.modules.values():
            del module.forward
    # The down path ended long before the last layer is used: none of it ran again.
    assert ran and not any(name.startswith("down_blocks.") for name in ran)
    assert any(name.startswith("up_blocks.") for name in ran)


def test_a_call_that_changes_its_arguments_is_never_replayed(models):
    _, fast = models
    names = fast.replay.names[0]
    kept = {names[index] for index in fast.replay.kept[0]}
    # The up blocks pop their skips from a list argument: replaying one would leave the list as it was.
    assert not any(name.count(".") == 1 and name.startswith("up_blocks.") for name in kept)
    assert any(name.startswith("down_blocks.") for name in kept)


def test_a_forward_that_takes_another_path_stops_the_replay_and_stays_exact(tiny_sd_checkpoint, analysis_inputs):
    """A path that depends on the values (here: a switch) numbers the calls differently: nothing is replayed after it."""
    state = {"twice": False}

    def branching(block):
        forward = type(block).forward

        def run(h, temb, context):
            if state["twice"]:
                h = forward(block, h, temb, context)
            return forward(block, h, temb, context)

        block.forward = run

    previous = torch.get_num_threads()
    try:
        plain = _model(tiny_sd_checkpoint, analysis_inputs, False)
        fast = _model(tiny_sd_checkpoint, analysis_inputs, True)
        for model in (plain, fast):
            branching(model.module.mid_block)
        first = min(fast.layers, key=lambda layer: layer.order).name
        assert fast.psnr_with(fast.palettized({first: 4})) == plain.psnr_with(plain.palettized({first: 4}))
        assert not fast.replay.broken
        state["twice"] = True
        early = sorted(fast.layers, key=lambda layer: layer.order)[3].name
        assert fast.psnr_with(fast.palettized({early: 4})) == plain.psnr_with(plain.palettized({early: 4}))
        assert fast.replay.broken
        last = max(fast.layers, key=lambda layer: layer.order).name
        assert fast.psnr_with(fast.palettized({last: 4})) == plain.psnr_with(plain.palettized({last: 4}))
    finally:
        torch.set_num_threads(previous)


def test_the_whole_analysis_equals_the_straightforward_one(analysis, tiny_sd_checkpoint, analysis_inputs, tmp_path, monkeypatch):
    """Replay, attention in blocks, weights swapped one layer at a time and palettized from kept palettes,
    against every forward run whole, attention unblocked, the replacement weights made up front and
    each one's k-means run afresh: the same recipes, PSNR within 0.1 dB."""
    import contextlib
    import functools
    import json

    from sdbuild.models import chunked_attention

    fast = json.loads(analysis.read_text())
    afresh: dict = {}  # each (layer, width)'s k-means run once here, apart from the palettes the analysis kept

    def palettized_afresh(self, name, bits):
        if (name, bits) not in afresh:
            afresh[name, bits] = analysis_module.fake_palettize(self.weight16(name), bits)
        return afresh[name, bits]

    monkeypatch.setattr(analysis_module._Model, "palettized_layer", palettized_afresh)
    monkeypatch.setattr(analysis_module, "_Model", functools.partial(analysis_module._Model, replay=False))
    monkeypatch.setattr(chunked_attention, "chunked_scores", lambda elements=None: contextlib.nullcontext())
    monkeypatch.setattr(analysis_module, "_Lazy", lambda names, value: {name: value(name) for name in names})
    plain = json.loads(analyze_tiny_unet(tiny_sd_checkpoint, analysis_inputs, tmp_path).read_text())
    assert fast["recipes"] == plain["recipes"] and len(fast["recipes"]) >= 5
    assert fast["baselines"].keys() == plain["baselines"].keys()
    for name, value in plain["baselines"].items():
        assert fast["baselines"][name] == pytest.approx(value, abs=0.1), name
    for mine, theirs in zip(fast["layers"], plain["layers"], strict=True):
        assert mine["name"] == theirs["name"]
        for bits, value in theirs["psnr"].items():
            assert mine["psnr"][bits] == pytest.approx(value, abs=0.1), (mine["name"], bits)
    for key, points in plain["curves"].items():
        assert np.allclose(fast["curves"][key], points, atol=0.1), key


def test_attention_in_blocks_measures_what_whole_attention_measures(models, monkeypatch):
    """Blocks of a few query rows (the analysis's ATTENTION_BLOCK is far above the tiny unet's scores)."""
    plain, _ = models
    recipe = plain.palettized({plain.layers[0].name: 2})
    whole = plain.psnr_with(recipe)
    monkeypatch.setattr(analysis_module, "ATTENTION_BLOCK", 256)
    calls = []
    from sdbuild.models import chunked_attention

    original = chunked_attention.chunked_attention
    monkeypatch.setattr(chunked_attention, "chunked_attention", lambda *a: (calls.append(a[5]), original(*a))[1])
    blocked = plain.psnr_with(recipe)
    assert calls and set(calls) == {256}
    assert blocked == pytest.approx(whole, abs=1e-3) and np.isfinite(blocked)


def test_a_swap_of_every_layer_makes_one_replacement_at_a_time_and_puts_the_weights_back(models):
    plain, _ = models
    before = {layer.name: layer.module.weight.detach().clone() for layer in plain.layers}
    made, alive = [], []

    def value(name):
        import weakref

        w = analysis.fake_linear8(plain.weight16(name))
        alive.append(sum(ref() is not None for ref in made))  # replacements still held when this one is made
        made.append(weakref.ref(w))
        return w

    lazy = analysis._Lazy([layer.name for layer in plain.layers], value)
    assert plain.psnr_with(lazy) < plain.psnr_with({})
    # The loop holds the previous replacement until it takes the next: never more (a dict would hold them all).
    assert len(made) == len(plain.layers) and max(alive) <= 1
    for layer in plain.layers:
        assert torch.equal(layer.module.weight, before[layer.name]), layer.name


def test_palettes_made_ahead_in_a_worker_are_the_ones_made_here(models, monkeypatch):
    from sdbuild.compress.kmeans import kmeans_lut

    plain, _ = models
    monkeypatch.setattr(analysis_module, "WORKER_ELEMENTS", 0)  # the tiny unet would not start one
    names = [layer.name for layer in plain.layers[:5]]
    saved = dict(plain.luts)
    plain.luts.clear()
    palettes = analysis._Palettes(plain, names, (1, 4, 8))
    try:
        assert palettes.pool is not None and len(palettes.running) == analysis.PALETTES_AHEAD
        for name in names:
            palettes.take(name)
        ahead = dict(plain.luts)
    finally:
        palettes.close()
        plain.luts.clear()
        plain.luts.update(saved)
    assert set(ahead) == {(name, b) for name in names for b in (1, 4, 8)}
    for (name, b), lut in ahead.items():
        assert np.array_equal(lut.view(np.uint16), kmeans_lut(plain.weight16(name), b).view(np.uint16)), (name, b)
