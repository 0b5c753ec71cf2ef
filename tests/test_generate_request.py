"""A generate request: one object the CLI fills by name, checked once before any model loads."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from sdbuild.cli import parser
from sdbuild.generate import GenerateRequest, GenerationError, Pipeline
from sdbuild.generate.command import _GENERATE_SETTINGS


def _parsed(tmp_path, *flags):
    return parser().parse_args(["generate", "--bundle", str(tmp_path), "--prompt", "a cat", *flags])


def test_every_generate_flag_is_a_request_field(tmp_path):
    args = _parsed(tmp_path)
    # Every flag but --json (how to print) lands in the request under its own name.
    flags = set(vars(args)) - {"command", "func", "json"}
    assert flags <= {f.name for f in fields(GenerateRequest)}, flags - {f.name for f in fields(GenerateRequest)}


def test_the_cli_fills_the_request_by_name(tmp_path):
    args = _parsed(tmp_path, "--steps", "3", "--seed", "7", "--image", "in.png", "--controlnet", "a", "b",
                   "--controlnet-inputs", "x.png", "y.png", "-o", "out", "--json")
    request = GenerateRequest.from_namespace(args, progress=not args.json)
    assert (request.bundle, request.steps, request.seed, request.progress) == (tmp_path, 3, 7, False)
    assert request.image == Path("in.png") and request.output_dir == Path("out")
    assert request.controlnet == ("a", "b") and request.controlnet_inputs == (Path("x.png"), Path("y.png"))
    assert request.strength is None and request.refiner_start == 0.8  # defaults are the request's


def test_checked_settles_strength_by_what_is_asked(tmp_path):
    plain = GenerateRequest(bundle=tmp_path, prompt="x", image=tmp_path / "in.png").checked()
    inpaint = GenerateRequest(bundle=tmp_path, prompt="x", image=tmp_path / "in.png", mask=tmp_path / "m.png").checked()
    assert (plain.strength, inpaint.strength) == (0.75, 1.0)
    assert GenerateRequest(bundle=tmp_path, prompt="x", strength=0.3).checked().strength == 0.3


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rng": "mersenne"}, "--rng: unknown mode 'mersenne'"),
        ({"scheduler": "nope"}, "--scheduler: unknown scheduler 'nope'"),
        ({"controlnet": ["a"], "controlnet_inputs": []}, "0 control images for 1 ControlNet"),
        ({"controlnet": ["a", "b"], "controlnet_inputs": ["x", "y"], "controlnet_scale": [1.0, 2.0, 3.0]}, "3 scales for 2 ControlNets"),
        ({"mask": "m.png"}, "--mask goes with --image"),
        ({"refiner_start": 2.0}, "--refiner-start 2"),
    ],
)
def test_a_request_no_image_can_come_from_is_refused_once_checked(tmp_path, changes, message):
    request = GenerateRequest(bundle=tmp_path, prompt="x", **changes)  # building it checks nothing
    with pytest.raises(GenerationError, match=message):
        request.checked()


def test_the_pipeline_takes_the_request_settings_under_their_names():
    # The settings run_generate hands Pipeline.generate are named alike on both sides, none forgotten.
    assert set(_GENERATE_SETTINGS) >= {"prompt", "negative_prompt", "seed", "steps", "guidance_scale", "scheduler", "rng",
                                       "image_count", "strength", "controlnet_scale", "refiner_start", "progress"}
    assert "bundle" not in _GENERATE_SETTINGS and hasattr(Pipeline, "generate")
