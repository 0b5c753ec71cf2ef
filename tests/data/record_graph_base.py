"""Records the stage graph of the planned recipes at the base commit (1083e68), before stages
declared what they consume: every node's key and edges, by planning only (no build).

Run once at that commit (``PYTHONPATH=. python tests/data/record_graph_base.py``); it wrote
``graph_base.json``, which ``tests/test_graph.py`` compares the derived graph with. Run again at
432bbae (main, with the hand-wired W8A8 calibration) with the W8A8 cases added: the earlier
cases came out identical, the W8A8 ones were added. Kept as the record of how the fixture was
made; it uses the base commit's API (``sample_node``, ``bundle_key``).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from graph_cases import CASES, structural_keys  # noqa: E402


def record(case: str, recipe: Path, overrides: dict, compiler: str | None, tmp: Path) -> list[dict]:
    import sdbuild.stages.compile as compile_stage
    from sdbuild import executor

    compile_stage.compiler_available = lambda: compiler is not None
    compile_stage.compiler_version = lambda: compiler
    build = executor.prepare(recipe, tmp, overrides)
    nodes = list(build.nodes)
    bundle = executor.Node(executor.Stage("bundle", "", ""), None, list(build.nodes))
    bundle.key = executor.bundle_key(build)
    nodes.append(bundle)
    if build.recipe.verify.sample_image:
        nodes.append(executor.sample_node(build))
    return [
        {"stage": n.stage.name, "component": n.component, "key": n.key, "deps": [[d.stage.name, d.component] for d in n.deps]}
        for n in nodes
    ]


if __name__ == "__main__":
    out = {}
    with structural_keys(), tempfile.TemporaryDirectory() as tmp:
        for name, recipe, overrides in CASES:
            for platform, compiler in (("linux", None), ("macos", "coremlcompiler 3400.1")):
                out[f"{name}/{platform}"] = record(name, recipe, overrides, compiler, Path(tmp))
    (HERE / "graph_base.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"{len(out)} graphs, {sum(map(len, out.values()))} nodes")
