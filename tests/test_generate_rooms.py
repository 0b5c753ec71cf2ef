"""sdbuild.generate's rooms import downward only, and the keys of what uses bundle names cover them."""

from __future__ import annotations

import ast
from pathlib import Path

import sdbuild.generate
from sdbuild.executor import stage_modules

# Bottom first: a room may import only rooms before it in this list.
ROOMS = ["errors", "images", "schedulers", "request", "discovery", "runners", "pipeline", "command", "sample", "calibrate"]


def _imports(path: Path) -> set[str]:
    """The modules a file's import statements name (anywhere in it, functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_every_room_imports_only_rooms_below_it():
    folder = Path(sdbuild.generate.__file__).parent
    assert sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__") == sorted(ROOMS)
    for i, room in enumerate(ROOMS):
        imported = {m for m in _imports(folder / f"{room}.py") if m == "sdbuild.generate" or m.startswith("sdbuild.generate.")}
        assert "sdbuild.generate" not in imported, f"{room} imports the package that imports it"
        above = {f"sdbuild.generate.{r}" for r in ROOMS[i:]}
        assert not imported & above, f"{room} imports {sorted(imported & above)}"


def test_the_names_other_code_imports_are_the_packages():
    for name in ("run_generate", "Pipeline", "save_png", "GenerationError", "find_bundle", "find_controlnet",
                 "load_image", "load_mask", "make_scheduler", "REFINER_START", "_clip_pixels", "SCHEDULERS",
                 "ChainedRunner", "ModelRunner", "image_file_name", "scheduler_name"):
        assert hasattr(sdbuild.generate, name), name


def test_keys_of_what_uses_bundle_names_cover_them():
    # The bundle stage and the sample stage's generate read file names from sdbuild.bundle_names: a change there moves their keys.
    for module in ("sdbuild.stages.bundle", "sdbuild.generate.sample", "sdbuild.generate.discovery"):
        assert "sdbuild.bundle_names" in stage_modules((module,)), module
