"""The stage graph of a build: planning, scheduling, child processes.

For each component: trace → convert → compress → chunk → compile, after one
download; then verify, and bundle and its sample image over them all. The
graph and its keys come from each stage's declaration
(sdbuild/stages/__init__.py): which components it applies to, what it
consumes (its upstream), its name and version, the recipe fields it reads,
the versions of the libraries it uses and a digest of its own source.
"""

from __future__ import annotations

import contextlib
import errno
import ast
import functools
import gc
import hashlib
import importlib.metadata
import json
import multiprocessing
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from sdbuild import __version__, faults
from sdbuild.cache import (
    DISK_FULL,
    DiskFullError,
    Entry,
    LocalCache,
    STATE,
    RemoteCache,
    as_disk_full,
    remember_input_digests,
    sha256_file,
    disk_full_line,
    pid_alive,
    stage_key,
    stage_tmpdir,
    sweep_build_temps,
    tree_bytes,
    write_json_atomic,
)
from sdbuild.errors import RecipeError, SdbuildError, UsageError
from sdbuild.families import FAMILIES, INPAINT_CHANNELS
from sdbuild.recipe import Recipe, check_buildable, check_local_sources, load_recipe
from sdbuild.stages import EVERY, ORDER, PACKAGE_OF, REFINER, SHIPPED, STAGES, Job, Plan, Stage
from sdbuild.torch_cache import ENV as TORCH_CACHE_ENV
from sdbuild.workers import short_socket_dir

DEFAULT_ARTIFACTS = Path("artifacts")
CHAIN_MIN_DB = 60.0  # chunking must not change the numbers: chained parts vs the whole, fp32


# --- keys --------------------------------------------------------------------

_digests: dict[str, str] = {}


def library_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions from package metadata (no import), ``absent`` for what is not installed."""
    return {"python": platform.python_version(), **{name: _distribution_version(name) for name in names}}


@functools.lru_cache(maxsize=None)
def _distribution_version(name: str) -> str:
    # Each lookup parses a METADATA file: once per run per distribution, not once per stage.
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


PACKAGE_DIR = Path(__file__).resolve().parent  # sdbuild/


def module_source(module: str, package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The file of an sdbuild module (``sdbuild.a.b`` → ``a/b.py`` or ``a/b/__init__.py``), found without importing it."""
    base = package_dir.joinpath(*module.split(".")[1:])
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


# An import statement's first line: `import a.b` or `from a import b` at any indentation.
_IMPORT_LINE = re.compile(r"^[ \t]*(?:import[ \t]+[^\n]+|from[ \t]+[\w.]+[ \t]+import[ \t]+(?:\([^)]*\)|[^\n]+))", re.M)


@functools.lru_cache(maxsize=None)
def imported_modules(module: str, package_dir: Path = PACKAGE_DIR) -> frozenset[str]:
    """The sdbuild modules ``module``'s source imports anywhere in it (functions too), with their parent packages.

    Each import statement is found by its line and parsed with ``ast``; parsing
    whole modules would cost a warm run most of its time. A line that only
    looks like one (in a docstring) can add a module, never drop one: a
    statement the line scan cannot parse (a ``)`` in a comment inside an
    import's parentheses, say) sends the whole module to ``ast``.
    """
    source = module_source(module, package_dir)
    package = module.split(".") if source.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    text = source.read_text()
    statements = []
    for match in _IMPORT_LINE.finditer(text):
        try:
            (node,) = ast.parse(match.group(0).strip().rstrip("\\")).body
        except SyntaxError:
            if "(" in match.group(0):
                statements = [n for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.Import, ast.ImportFrom))]
                break
            continue  # a docstring's line that only looks like an import
        statements.append(node)
    for node in statements:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package[: len(package) - node.level + 1] if node.level else []
            base = ".".join(parts + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]  # a name may be a submodule
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "sdbuild":
                # Importing a.b.c runs a and a.b first.
                found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return frozenset(name for name in found if module_source(name, package_dir) is not None)


def stage_modules(roots: tuple[str, ...], package_dir: Path = PACKAGE_DIR) -> list[str]:
    """``roots`` and every sdbuild module they import, transitively, read with ``ast``: nothing is imported."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if module_source(name, package_dir) is None:
            raise RuntimeError(f"stage code {name} not found")
        seen.add(name)
        todo.extend(imported_modules(name, package_dir) - seen)
    return sorted(seen)


def code_digest(modules: tuple[str, ...], package_dir: Path = PACKAGE_DIR) -> str:
    """sha256 over the source of ``modules`` and of every sdbuild module they import, transitively."""
    h = hashlib.sha256()
    for name in stage_modules(modules, package_dir):
        key = f"{package_dir}:{name}"
        if key not in _digests:
            _digests[key] = hashlib.sha256(module_source(name, package_dir).read_bytes()).hexdigest()
        h.update(name.encode() + b"\0" + _digests[key].encode())
    return h.hexdigest()[:16]


def stage_code(stage: Stage) -> tuple[str, ...]:
    """The modules whose source (and imports) a stage's key covers: its ``run`` module, plus any it declares."""
    return (stage.run.split(":")[0], *stage.code)


# --- the graph ---------------------------------------------------------------


@dataclass(eq=False)
class Node:
    """One stage output to have: a stage for one component (or for the whole model)."""

    stage: Stage
    component: str | None
    deps: list["Node"] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)
    key: str | None = None
    record: dict = field(default_factory=dict)
    status: str = "pending"  # cached | built | failed | skipped
    entry: Entry | None = None
    files: dict[str, Path] = field(default_factory=dict)  # input files the stage reads, keyed by content in fields
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    window: tuple[float, float] | None = None  # when it ran in this run: (start, end), time.time()
    ships: bool = True  # False: built only for another stage (the calibration's text encoder), not bundled

    @property
    def label(self) -> str:
        return f"{self.stage.name} {self.component}" if self.component else self.stage.name


def read_fields(recipe: Recipe, names: tuple[str, ...], extra: dict[str, Any]) -> dict[str, Any]:
    return {n: extra[n] if n in extra else recipe.get(n) for n in names}


def components_of(recipe: Recipe, family: str) -> list[str]:
    """What the recipe converts; a multilingual projection takes the text encoder's place."""
    components = list(recipe.components or FAMILIES[family].components)
    if recipe.multilingual_projection:
        components = ["multilingual_projection"] + [c for c in components if not c.startswith("text_encoder")]
    return components


def projection_input(recipe: Recipe, recipe_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The recipe's projection file, and the field that puts its content (not its path or time) in the key."""
    from sdbuild.cache import sha256_file
    from sdbuild.errors import RecipeError
    from sdbuild.stages.trace import PROJECTION_DIGEST

    path = (recipe_dir / recipe.multilingual_projection).resolve()
    if not path.is_file():
        raise RecipeError(
            f"multilingual_projection: file not found: {path} (paths are relative to the recipe's folder)"
        )
    return path, {PROJECTION_DIGEST: sha256_file(path)}


def pre_analysis_fields(recipe: Recipe, recipe_dir: Path) -> dict[str, Any]:
    """A pre-analysis file named by the recipe enters the compress key by its content."""
    from sdbuild.cache import sha256_file

    name = recipe.compression.mixed_bit.pre_analysis
    if name == "auto":
        return {}
    path = (recipe_dir / name).resolve()
    if not path.is_file():
        raise RecipeError(
            f"compression.mixed_bit.pre_analysis: file not found: {path} (paths are relative to the recipe's folder; or use auto)"
        )
    return {"pre_analysis_file": str(path), "pre_analysis_sha256": sha256_file(path)}


def build_graph(
    recipe: Recipe,
    source: dict,
    family: str,
    recipe_dir: Path = Path("."),
    with_analysis: bool = False,
    controlnets: dict[str, dict] | None = None,
    compiler: str | None = None,
    refiner: dict | None = None,
) -> list[Node]:
    """Nodes in dependency order. ``source`` is what the download resolved to.

    Which components the build has is decided here; which stages each one
    gets, and what each node consumes, is derived from the stages'
    declarations (``sdbuild.stages.STAGES``: ``applies``, ``consumes``,
    ``scope``). ``with_analysis`` adds the unet's mixed-bit pre-analysis even
    when the recipe's compression does not use it (``sdbuild analyze``).
    ``controlnets`` maps each of the recipe's ControlNets to its resolved
    source; with any, the controlled unet is built beside the plain one.
    ``compiler`` is coremlcompiler's version where it exists (macOS): then
    every shipped package is compiled too. ``refiner``: the recipe's
    ``model.refiner`` resolved; its unet is built from its own download as
    ``unet_refiner`` (the base's second text encoder serves it, as in Apple's Swift package).
    """
    plan = plan_of(recipe, source, family, with_analysis, controlnets, compiler, refiner)
    nodes = derive_nodes(plan)
    for node in nodes:
        node.fields, node.files = node_fields(plan, node, recipe_dir)
    return nodes


def plan_of(recipe: Recipe, source: dict, family: str, with_analysis: bool, controlnets: dict[str, dict] | None,
            compiler: str | None, refiner: dict | None) -> Plan:
    """The build's components and the facts the stages' declarations ask about."""
    from sdbuild.stages.bundle import layout_components

    comp = recipe.compression
    compressed = set(comp.components) if comp else set()
    mixed_bit = comp is not None and comp.mixed_bit is not None
    if mixed_bit:
        compressed &= {"unet"}  # the pre-analysis measures the unet; other components stay float16
    res = recipe.resolutions[0]
    # The safety checker in the variant(s) the layout's clients feed (Swift: 512x512 images; Python: the image).
    components = layout_components(components_of(recipe, family), recipe.bundle.layout, res.height, res.width)
    if is_inpainting_source(source) and "vae_decoder" in components and "vae_encoder" not in components:
        # Inpainting encodes the masked image: the VAE encoder ships beside the decoder.
        components.insert(components.index("vae_decoder") + 1, "vae_encoder")
    if recipe.controlnet and "unet" in components:
        components.insert(components.index("unet") + 1, "controlled_unet")
    if recipe.multilingual_projection and not FAMILIES[family].multilingual:
        raise RecipeError("multilingual_projection: Apple's SDXL pipeline takes no multilingual text encoder (SD 1.x/2.x only)")
    calibrating = comp is not None and comp.activations is not None
    if calibrating and not FAMILIES[family].w8a8:
        raise RecipeError(
            f"compression.activations: int8: model.version is an {'SDXL refiner' if family == 'sdxl-refiner' else 'SDXL'} model; "
            "W8A8 is built for SD 1.x/2.x unets only (as Apple's converter): remove activations for linear 8-bit weights"
        )
    if calibrating and is_inpainting_source(source):
        raise RecipeError(
            "compression.activations: int8 is not built for inpainting unets (calibration runs text to image); "
            "remove activations for linear 8-bit weights"
        )
    sources = {REFINER: refiner} if refiner is not None else {}
    sources.update({f"controlnet/{name}": src for name, src in (controlnets or {}).items()})
    facts = {
        "source": source,
        "coremlcompiler": compiler,
        "multires": recipe.multires_kind,  # the default resolved: functions where the target has them
        "recipe": recipe.model_dump(mode="json"),
        "family": family,
        "calibration": comp.calibration_settings if comp else None,  # its defaults filled in
        "analysis": recipe.analysis_settings,  # the pre-analysis's inputs, defaults filled in
    }
    analysis = with_analysis or (mixed_bit and comp.mixed_bit.pre_analysis == "auto")
    return Plan(recipe, components + list(sources), sources, compressed, mixed_bit, analysis, calibrating, compiler, facts)


def chain_stages(ends: tuple[str, ...] = SHIPPED.stages) -> set[str]:
    """The stages a component's shipped package comes out of (``SHIPPED`` and what they consume, transitively);
    or, given ``ends``, those stages and what they consume.

    They are planned component by component; the stages that take a finished
    package (verify, compile) after every component's chain, stage by stage.
    """
    found: set[str] = set()
    todo = list(ends)
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            todo += [s for i in STAGES[name].inputs() for s in i.stages]
    return found


def derive_nodes(plan: Plan) -> list[Node]:
    """The graph's nodes, each stage's where its ``applies`` holds, each with its ``consumes`` as ``deps``.

    Order: the model's download; each component's chain (its own download,
    a whole-build stage labelled with it, then its stages in build order),
    the components another one's stage consumes (``Input.component``) first;
    the other per-component stages; the whole-build stages. A consumed
    component the build does not ship gets only the chain stages consumed of
    it, not shipped (``Node.ships``).
    """
    nodes: list[Node] = []
    by_key: dict[tuple[str, str | None], Node] = {}
    chain = chain_stages()
    borrowed = borrowed_stages(plan)

    def add(stage: Stage, component: str | None, ships: bool = True) -> None:
        node = Node(stage, component, consumed(plan, stage, component, nodes, by_key), ships=ships)
        nodes.append(node)
        by_key[stage.name, component] = node

    def planned(scope: str, in_chain: bool) -> list[Stage]:
        return [s for s in STAGES.values() if s.scope == scope and (s.name in chain) == in_chain]

    for stage in planned("source", True):
        add(stage, None)
    for component in borrowed:
        if component not in plan.components:
            for stage in planned("component", True):
                if stage.name in borrowed[component] and stage.applies(plan, component):
                    add(stage, component, ships=False)
    for component in [*(c for c in borrowed if c in plan.components), *(c for c in plan.components if c not in borrowed)]:
        for stage in planned("source", True):
            if component in plan.sources:
                add(stage, component)
        for stage in planned("build", True):
            if stage.component == component and stage.applies(plan, component):
                add(stage, component)
        for stage in planned("component", True):
            if stage.applies(plan, component):
                add(stage, component)
    for stage in planned("component", False):
        for component in plan.components:
            if stage.applies(plan, component):
                add(stage, component)
    for stage in planned("build", False):
        if stage.applies(plan, stage.component):
            add(stage, stage.component)
    return nodes


def borrowed_stages(plan: Plan) -> dict[str, set[str]]:
    """The components a stage of another component consumes (``Input.component``) → the chain
    stages that input needs of it (the calibration's text encoder: trace and convert)."""
    out: dict[str, set[str]] = {}
    for stage in STAGES.values():
        for wanted in stage.inputs():
            if wanted.component is None or (wanted.when is not None and not wanted.when(plan)):
                continue
            if any(stage.applies(plan, c) for c in plan.components):
                out.setdefault(wanted.component, set()).update(chain_stages(wanted.stages))
    return out


def consumed(plan: Plan, stage: Stage, component: str | None, nodes: list[Node],
             by_key: dict[tuple[str, str | None], Node]) -> list[Node]:
    """The nodes planned so far that ``stage``'s declared inputs name for ``component`` (or for the
    other component an input names)."""
    deps: list[Node] = []
    for wanted in stage.inputs():
        if wanted.when is not None and not wanted.when(plan):
            continue
        for name in wanted.stages:
            of = wanted.component or component
            found = list(nodes) if wanted is EVERY else providers(name, stage, of, nodes, by_key)
            if found:
                deps += [n for n in found if n not in deps]
                break
    return deps


def providers(name: str, consumer: Stage, component: str | None, nodes: list[Node],
              by_key: dict[tuple[str, str | None], Node]) -> list[Node]:
    """The nodes of stage ``name`` that serve ``component``: its own; its checkpoint's download (the
    model's unless it has its own); the one whole-build node; for a whole-build consumer, every component's."""
    scope = STAGES[name].scope
    if scope == "build":
        return [n for n in nodes if n.stage.name == name]
    if consumer.scope == "build" and scope == "component":
        return [n for n in nodes if n.stage.name == name]
    own = by_key.get((name, component))
    if own is None and scope == "source":
        own = by_key.get((name, None))
    return [own] if own is not None else []


def node_fields(plan: Plan, node: Node, recipe_dir: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """A node's fields (what its declaration reads, with the input files named by the recipe
    keyed by content) and the input files its stage opens."""
    recipe, stage = plan.recipe, node.stage
    if stage.scope == "source" and node.component in plan.sources:
        return {"source": plan.sources[node.component]}, {}  # a ControlNet's or the refiner's own checkpoint
    extra: dict[str, Any] = {}
    files: dict[str, Path] = {}
    if stage.name == "compress" and plan.mixed_bit:
        extra = pre_analysis_fields(recipe, recipe_dir)
    if stage.name == "trace" and node.component == "multilingual_projection":
        path, extra = projection_input(recipe, recipe_dir)
        files = {"multilingual_projection": path}
    return read_fields(recipe, stage.fields_for(node.component) + tuple(extra), {**plan.facts, **extra}), files


def assign_keys(nodes: list[Node]) -> None:
    for node in nodes:
        s = node.stage
        # By stage and component: a node may follow several of one stage (sample follows every verify).
        upstream = {f"{d.stage.name}:{d.component or ''}": d.key for d in node.deps}
        versions = library_versions(s.libraries)
        version = f"{s.version}+{code_digest(stage_code(s))}"
        fields = dict(node.fields, component=node.component)
        node.key = stage_key(s.name, version, fields, upstream, versions)
        node.record = {"stage_version": version, "fields": fields, "upstream": upstream, "versions": versions}


def final_nodes(nodes: list[Node]) -> dict[str, Node]:
    """Each component's package (``PACKAGE_OF``): its compress node where it has one, else its convert node."""
    packages = {c: PACKAGE_OF.first(stages) for c, stages in by_component(nodes).items()}
    return {c: node for c, node in packages.items() if node is not None}


def by_component(nodes: list[Node]) -> dict[str, dict[str, Node]]:
    """component → stage name → its node, for the nodes of a component that ships (``Node.ships``)."""
    out: dict[str, dict[str, Node]] = {}
    for node in nodes:
        if node.component and node.ships:
            out.setdefault(node.component, {})[node.stage.name] = node
    return out


def at_publish(stage: Stage) -> bool:
    """Whether the stage runs when the build folder is laid out: it publishes it, or comes after one that does."""
    return stage.publishes or any(STAGES[name].publishes for name in stage.after)


# --- child processes ---------------------------------------------------------

# What the stage server imports once per run; every stage process forks from it with these loaded.
STAGE_SERVER_PRELOAD = (
    "sdbuild.stages.server",  # first: sends the server's own output away from the terminal
    "numpy",
    "torch",
    "coremltools",
    "transformers",
    "diffusers",
    # diffusers and transformers import their models and pipelines lazily, on first use:
    # preloaded here, a stage does not pay it again (1.5-2.5 s a stage).
    "diffusers.models.unets.unet_2d_condition",
    "diffusers.models.autoencoders.autoencoder_kl",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
    "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
    "transformers.models.clip.modeling_clip",
    "sdbuild.models.unet",
    "sdbuild.models.text_encoder",
    "sdbuild.models.vae",
    "sdbuild.convert",
    "sdbuild.compress",
    "sdbuild.mil.executor",
    "sdbuild.generate",
    "sdbuild.synthetic",
    "sdbuild.executor",
    "sdbuild.cli",
    "sdbuild.stages.server_ready",  # last: removes the folder torch made in TMPDIR at import
)
SERVER_PARENT_ENV = "SDBUILD_STAGE_SERVER_PARENT"  # the pid of the process starting the stage server (server._end_with_the_build)
SERVER_FOLDER_ENV = "SDBUILD_STAGE_SERVER_FOLDER"  # the server's own folder for torch's cache, made by the build (server.py)
SERVER_PRELOAD_ENV = "SDBUILD_STAGE_SERVER_PRELOAD"  # what it imports, comma-separated (server.py reads whether coremltools)
# Every server imports these, whatever its stages: its own set-up and tidying, and the stage process's entry point.
SERVER_OWN_PRELOAD = ("sdbuild.stages.server", "numpy", "sdbuild.executor", "sdbuild.cli", "sdbuild.stages.server_ready")
WORKERS_ENV = "SDBUILD_WORKERS"  # forkserver (default) | spawn: a fresh interpreter per stage, the old path


def stage_start_method() -> str:
    """How stage processes start: ``forkserver`` (from the warm stage server) or ``spawn``."""
    wanted = os.environ.get(WORKERS_ENV) or "forkserver"
    if wanted not in ("forkserver", "spawn"):
        raise SdbuildError(f"{WORKERS_ENV}={wanted}: choose forkserver or spawn")
    if wanted == "forkserver" and "forkserver" in multiprocessing.get_all_start_methods() and short_socket_dir():
        return "forkserver"
    return "spawn"


def server_preload(stages: Iterable[str] | None = None) -> list[str]:
    """What a stage server for ``stages`` (names) imports, in ``STAGE_SERVER_PRELOAD``'s order: the server's
    own modules and the stages' ``preload``; every library where ``stages`` is None or names one unknown."""
    names = None if stages is None else set(stages)
    if names is None or not names <= set(STAGES):
        return list(STAGE_SERVER_PRELOAD)
    wanted = set(SERVER_OWN_PRELOAD).union(*(STAGES[name].preload for name in names))
    return [name for name in STAGE_SERVER_PRELOAD if name in wanted]


def start_stage_server(stages: Iterable[str] | None = None) -> None:
    """Start the stage server now, so it imports the heavy libraries while the build gets ready.

    It lives until the build process ends (once per run, not per stage) and
    imports what the stages it is for use (``server_preload(stages)``). A no-op
    with spawn workers, or where one already running in this process has those.
    One that lacks some is ended and another, with its modules and these,
    started in its place, where no stage process of this one runs and this is
    the main thread (the one the server's parent-death signal follows); else it
    serves as it is, and a stage imports what the server lacks itself.
    """
    # Stages run side by side, each with torch's OpenMP threads (one per core): a thread
    # spinning at a barrier for a descheduled sibling burns the core that sibling needs
    # (the tiny unet's verify took 3-5x the CPU). Waiting passively changes only how an idle
    # thread waits, not how the work is split, so the numbers are the same. Read once,
    # when the server (or a spawned stage) loads torch; a user's own setting stands.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if stage_start_method() != "forkserver":
        return
    from multiprocessing import forkserver

    with _SERVER_LOCK:
        wanted = server_preload(stages)
        if forkserver._forkserver._forkserver_pid is not None:
            preloaded = forkserver._forkserver._preload_modules  # what the running one was started with (set below)
            if set(wanted) <= set(preloaded):
                wanted = preloaded
            elif _stages_running == 0 and threading.current_thread() is threading.main_thread():
                _stop_stage_server()
                wanted = [name for name in STAGE_SERVER_PRELOAD if name in {*wanted, *preloaded}]
            else:
                wanted = preloaded
        _ensure_stage_server(wanted)


def _ensure_stage_server(modules: list[str]) -> None:
    """Start a stage server importing ``modules`` unless this process's is alive."""
    from multiprocessing import forkserver

    if _stage_server_alive():
        return
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(modules))
    os.environ[SERVER_PARENT_ENV] = str(os.getpid())
    os.environ[SERVER_PRELOAD_ENV] = ",".join(modules)
    # ``import diffusers`` makes torch's cache folder; the server gets one of its own (server.py), made
    # here: a server still importing when the build ends (a recipe refused in planning) dies there,
    # before it could remove the folder, and the build removes it once the server is gone. Listed
    # before the server starts: a SIGTERM meanwhile (cli) removes it too.
    # multiprocessing's folder (the server's socket) is made here too, with SIGTERM held: made inside
    # ensure_running, a SIGTERM between its mkdtemp and multiprocessing noting it had the handler
    # (tidy_temp_folders) make and remove a second folder and leave the first.
    from multiprocessing import util

    folder = None
    with _sigterm_held():  # made and listed with no handler run between
        util.get_temp_dir()
        if TORCH_CACHE_ENV not in os.environ:
            if not _SERVERS_TO_END:  # once: a later server (the first died) joins the list it drains
                import atexit

                atexit.register(_end_stage_servers)
            folder = tempfile.mkdtemp(prefix="sdbuild-server-")
            _SERVERS_TO_END.append((None, folder))
    if folder is not None:
        os.environ[SERVER_FOLDER_ENV] = folder
    was = forkserver._forkserver._forkserver_pid
    try:
        forkserver.ensure_running()
    finally:
        os.environ.pop(SERVER_FOLDER_ENV, None)
        os.environ.pop(SERVER_PRELOAD_ENV, None)
    if folder is None:
        return
    at = _SERVERS_TO_END.index((None, folder))
    if forkserver._forkserver._forkserver_pid == was:  # it was running after all: the folder is not needed
        os.rmdir(folder)  # then unlisted: never a folder there and not listed
        del _SERVERS_TO_END[at]
    else:
        _SERVERS_TO_END[at] = (forkserver._forkserver._forkserver_pid, folder)


@contextlib.contextmanager
def _sigterm_held():
    """SIGTERM held back within (its handler runs after): a list the handler reads is never half-updated."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _stage_server_alive() -> bool:
    """Whether this process's stage server is running (not waited for: a dead one is reaped by the next start)."""
    from multiprocessing import forkserver

    pid = forkserver._forkserver._forkserver_pid
    return pid is not None and pid_alive(pid)


def _stop_stage_server() -> None:
    """End this process's stage server now (no stage runs from it) and forget it, its folder removed."""
    from multiprocessing import forkserver

    pid = forkserver._forkserver._forkserver_pid
    try:
        os.kill(pid, signal.SIGKILL)  # it may be importing still: it would read its lifeline only after
    except ProcessLookupError:
        pass
    forkserver._forkserver._stop()  # closes the lifeline, reaps it, removes its socket
    for entry in [e for e in _SERVERS_TO_END if e[0] == pid]:
        shutil.rmtree(entry[1], ignore_errors=True)  # then unlisted, as in _ensure_stage_server
        _SERVERS_TO_END.remove(entry)


_SERVER_LOCK = threading.RLock()
_stages_running = 0  # stage processes of this process started from its server and not yet ended
_SERVERS_TO_END: list[tuple[int | None, str]] = []  # (pid, folder) of each stage server this process started (None: starting)


def _end_stage_servers() -> None:
    while _SERVERS_TO_END:
        _end_stage_server(*_SERVERS_TO_END.pop())


def tidy_temp_folders() -> None:
    """What this process's exit does in TMPDIR, for an end that runs no exit code (the command line's
    SIGTERM): end the stage server and remove its folder, then multiprocessing's (the server's socket)."""
    from multiprocessing import util

    _end_stage_servers()
    shutil.rmtree(util.get_temp_dir(), ignore_errors=True)


def _end_stage_server(pid: int | None, folder: str) -> None:
    """At the build's exit: end the stage server (it would end with the build anyway), then remove its folder.

    In that order: a server still importing could make the folder again after it was removed. A server
    that died and was started again (multiprocessing waited for it then) is not signalled: its pid may be
    another process's by now."""
    from multiprocessing import forkserver

    if pid is not None and forkserver._forkserver._forkserver_pid == pid:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    shutil.rmtree(folder, ignore_errors=True)


def start_stage_server_if_cold(artifacts: Path, remote: RemoteCache | None = None) -> None:
    """Start the stage server before planning where every stage will be built: an artifacts folder
    with no cache yet and no remote cache to take entries from (``make demo`` on a fresh clone).

    Its imports (seconds) then overlap the command's own start and the planning; elsewhere
    it starts once planning finds a stage to build (a warm run starts none).
    """
    if remote is None and not (Path(artifacts) / "cache").exists():
        start_stage_server()


def stage_server_running() -> bool:
    """Whether this process has started the stage server (and it has not been stopped)."""
    from multiprocessing import forkserver

    return getattr(forkserver._forkserver, "_forkserver_pid", None) is not None


def _set_parent_death_signal() -> None:
    # A child must not outlive a killed build: it would keep working for nobody.
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _leave_stage_server() -> None:
    """Close this stage's copy of the build's lifeline to the stage server.

    The server exits when every copy is closed, which is when the build
    process is gone, and then the parent-death signal ends its stages.
    """
    from multiprocessing import forkserver

    server = forkserver._forkserver
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None and getattr(server, "_forkserver_pid", None) is None:  # inherited, not our own server's
        os.close(fd)
        server._forkserver_alive_fd = None


def _reset_peak_rss() -> None:
    # A forked process starts with its server's high-water mark; measure this stage's from here.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _child_main(run: str, job: Job, out: str, log: str, conn, env: dict[str, str] | None = None, run_pid: int | None = None) -> None:
    faults.run_pid = run_pid
    gc.enable()  # off in the stage server (sdbuild.stages.server)
    _set_parent_death_signal()
    _leave_stage_server()
    _reset_peak_rss()
    if env:
        # A forked stage has the server's environment, as of its start: set the stage's own here.
        os.environ.update(env)
        tempfile.tempdir = None  # re-read TMPDIR
    tmp = stage_tmpdir(Path(out))
    if tmp is not None:
        # Libraries' temporary files (coremltools' tmp*.mlpackage) go in the cache's temp area, and with it.
        # multiprocessing's socket folder stays in the system's (a socket path is at most 107 bytes); it goes at exit.
        import multiprocessing.util

        multiprocessing.util.get_temp_dir()
        os.environ["TMPDIR"] = str(tmp)
        tempfile.tempdir = None
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        result = _call_stage(run, job, Path(out))
        conn.send(("ok", result))
    except SdbuildError as e:
        conn.send(("user", e.exit_code, str(e)))
    except OSError as e:
        if e.errno not in DISK_FULL:
            traceback.print_exc()
            conn.send(("crash", type(e).__name__, str(e)))
        else:
            where = f"{job.stage} {job.component}" if job.component else job.stage
            conn.send(("user", 1, f"{where}: {disk_full_line(e, out)}"))  # the machine, not a bug: one line
    except BaseException as e:  # report, with the traceback in the log
        traceback.print_exc()
        conn.send(("crash", type(e).__name__, str(e).strip().splitlines()[0] if str(e).strip() else ""))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _call_stage(run: str, job: Job, out: Path) -> dict:
    import importlib

    module, name = run.split(":")
    labels = (job.stage, f"{job.stage}/{job.component}")
    faults.point("child-start", *labels)
    faults.watch_child_writes(out, *labels)
    result = getattr(importlib.import_module(module), name)(job, out) or {}
    faults.point("child-end", *labels)
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    result.setdefault("self_peak_rss_bytes", peak + peak_children)
    return result


class _TreeMemory(threading.Thread):
    """Samples the RSS of a process and all its children; keeps the peak of the sum.

    Finding the children reads every process's status on the machine (psutil), which cost
    more than the sampling itself: they are looked for again every ``refresh`` samples (a
    child gone before it was seen still counts in the stage's own ``RUSAGE_CHILDREN`` peak).
    """

    def __init__(self, pid: int, interval: float = 0.05, refresh: int = 10):
        super().__init__(daemon=True)
        self.pid, self.interval, self.refresh, self.peak = pid, interval, refresh, 0
        self._stop_event = threading.Event()

    def run(self):
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        children, samples = [], 0
        while not self._stop_event.is_set():
            try:
                if samples % self.refresh == 0:
                    children = root.children(recursive=True)
                samples += 1
                total = root.memory_info().rss
                for child in children:
                    try:
                        total += child.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                return
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


def run_in_child(run: str, job: Job, out: Path, log: Path, env: dict[str, str] | None = None) -> dict:
    """Run a stage function in a process of its own; its memory goes back when it ends.

    The process forks from the stage server (libraries already imported), or
    is a fresh interpreter with ``SDBUILD_WORKERS=spawn``. Its output goes to
    ``log``; ``env`` is set in its environment before the stage runs. Returns the stage's facts plus ``peak_rss_bytes`` of the child's
    process tree (its RSS counts the library pages it shares with the server,
    as a fresh interpreter's counted its own copy).
    """
    global _stages_running
    with _SERVER_LOCK:
        start_stage_server((job.stage,))
        _stages_running += 1  # the server stays until it ends
    try:
        ctx = multiprocessing.get_context(stage_start_method())
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child_main, args=(run, job, str(out), str(log), send, env, os.getpid()), daemon=False)
        proc.start()
        send.close()
        memory = _TreeMemory(proc.pid)
        memory.start()
        try:
            message = receive.recv()
        except (EOFError, OSError):  # nothing, or part of a message: the process died
            message = None
        proc.join()
        peak = memory.stop()
    finally:
        with _SERVER_LOCK:
            _stages_running -= 1
    where = f"{job.stage} {job.component}" if job.component else job.stage
    if message is None:
        how = f"killed by signal {-proc.exitcode}" if (proc.exitcode or 0) < 0 else f"exit status {proc.exitcode}"
        hint = " (out of memory?)" if proc.exitcode == -signal.SIGKILL else ""
        raise SdbuildError(f"{where}: the stage process died, {how}{hint}; see {log}")
    if message[0] == "user":
        error = SdbuildError(message[2])
        error.exit_code = message[1]  # a recipe error in a stage is still exit status 2
        raise error
    if message[0] == "crash":
        raise SdbuildError(f"{where} failed: {message[1]}: {message[2]} (traceback in {log})")
    result = message[1]
    result["peak_rss_bytes"] = max(peak, result.pop("self_peak_rss_bytes", 0))
    return result


# --- scheduling --------------------------------------------------------------

GiB = 1 << 30
# Peak RSS of a stage process with nothing measured yet: base + factor × the component's weight
# bytes (float32 on disk). Full-size measurements (README) sit below: SD 1.5's unet (3.4 GB)
# peaks at 4.2 GiB in trace and convert, SDXL's (10 GB) at 11 GiB.
PEAK_TABLE: dict[str, tuple[int, float]] = {
    "download": (1 * GiB, 1.0),
    "trace": (1 * GiB, 1.5),
    "convert": (1 * GiB, 1.5),
    "analyze": (1 * GiB, 2.0),
    "calibrate": (1 * GiB, 2.0),
    "compress": (1 * GiB, 1.5),
    "chunk": (1 * GiB, 1.5),
    "verify": (1 * GiB, 1.5),
    "sample": (1 * GiB, 1.5),
    "compile": (1 * GiB, 0.5),
}
SAME_SIZE = 1.25  # a measured peak stands for weights within this ratio of the ones it was measured on


def download_of(node: Node) -> Node | None:
    """The download a node's component comes from (its own, for a ControlNet's stages)."""
    for dep in node.deps:
        found = dep if dep.stage.name == "download" else download_of(dep)
        if found is not None:
            return found
    return None


def read_through(node: Node) -> dict[str, Path]:
    """The entries of ``node.stage.reads``: for each, the nearest node of that stage behind its deps
    (its trace's download, for verify) that has an entry; keyed through the deps, not again."""
    found: dict[str, Path] = {}
    seen: set[int] = set()
    todo = list(node.deps)
    while todo:
        dep = todo.pop(0)
        if id(dep) in seen:
            continue
        seen.add(id(dep))
        if dep.stage.name in node.stage.reads and dep.entry is not None:
            found.setdefault(dep.stage.name, dep.entry.path)
        todo += dep.deps
    return found


def input_bytes(node: Node) -> int:
    """Bytes of the checkpoint files the node's component loads: the scale of its memory (0: unknown)."""
    from sdbuild.stages import component_kind
    from sdbuild.stages.download import checkpoint_dir, vae_dir

    download = download_of(node)
    if download is None or download.entry is None or not node.component:
        return 0
    kind = component_kind(node.component)
    root = checkpoint_dir(download.entry.path)
    if kind in ("vae_decoder", "vae_encoder"):
        folder = vae_dir(download.entry.path)
    else:
        folder = root if kind == "controlnet" else root / {"controlled_unet": "unet", REFINER: "unet"}.get(kind, kind)
    return tree_bytes(folder) if folder.is_dir() else 0


class PeakEstimates:
    """A stage's expected peak RSS: the last one measured for its stage, component kind and size
    in the cache's manifests, else ``PEAK_TABLE``."""

    def __init__(self, cache: LocalCache):
        self.cache = cache
        self._measured: dict[tuple[str, str], list[tuple[str, int, int]]] | None = None

    def measured(self) -> dict[tuple[str, str], list[tuple[str, int, int]]]:
        """(stage, kind) → [(created, input bytes, peak RSS)] from every manifest that records them."""
        from sdbuild.stages import component_kind

        if self._measured is None:
            self._measured = {}
            for entry in self.cache.entries():
                m = entry.manifest
                if m.get("peak_rss_bytes") and m.get("input_bytes"):
                    kind = component_kind((m.get("fields") or {}).get("component"))
                    row = (m.get("created", ""), m["input_bytes"], m["peak_rss_bytes"])
                    self._measured.setdefault((entry.stage, kind), []).append(row)
        return self._measured

    def peak(self, stage: str, component: str | None, size: int) -> int:
        from sdbuild.stages import component_kind

        if size:
            same = [r for r in self.measured().get((stage, component_kind(component)), []) if max(r[1], size) <= SAME_SIZE * min(r[1], size)]
            if same:
                return max(same)[2]  # the newest
        base, factor = PEAK_TABLE.get(stage, (1 * GiB, 1.5))
        return int(base + factor * size)


class MemoryGate:
    """Admits stages while the sum of their estimated peaks fits in ``available`` bytes."""

    def __init__(self, available: int):
        self.available, self.reserved = available, 0

    def admits(self, need: int, running: int) -> bool:
        # Alone, a stage always starts: memory nothing else holds is all there is.
        return running == 0 or self.reserved + need <= self.available


def default_jobs() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def schedule(
    nodes: list[Node],
    run_node: Callable[[Node], None],
    *,
    jobs: int,
    gate: MemoryGate,
    estimate: Callable[[Node], int],
    started: Callable[[Node], None] = lambda node: None,
    finished: Callable[[Node, BaseException | None], None] = lambda node, error: None,
    waits_for: Callable[[Node], list[Node]] = lambda node: node.deps,
) -> None:
    """Run ``run_node(node)`` for every node once its dependencies (``waits_for(node)``) are done.

    Up to ``jobs`` at a time, in the nodes' order, each started only while
    ``gate`` admits ``estimate(node)`` beside those running. Dependencies not
    in ``nodes`` count as done. ``started`` and ``finished`` are called from
    this thread. After a failure nothing new starts; stages already running
    finish (their outputs are kept), then the first error is raised.
    """
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    pending = list(nodes)
    waiting_for = set(nodes)
    running: dict = {}
    failure: BaseException | None = None
    with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="stage") as pool:
        while running or (pending and failure is None):
            for node in list(pending) if failure is None else []:
                if len(running) >= jobs:
                    break
                if any(d in waiting_for for d in waits_for(node)):
                    continue
                need = estimate(node)
                if not gate.admits(need, len(running)):
                    continue
                pending.remove(node)
                gate.reserved += need
                started(node)
                running[pool.submit(run_node, node)] = (node, need)
            if not running:
                raise RuntimeError("the stage graph has a dependency cycle")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                node, need = running.pop(future)
                gate.reserved -= need
                error = future.exception()
                finished(node, error)
                if error is None:
                    waiting_for.discard(node)
                elif failure is None:
                    failure = error
    if failure is not None:
        raise failure


# --- plan and run ------------------------------------------------------------


@dataclass
class Build:
    """A recipe's graph, resolved and keyed; what ``plan`` shows and ``run`` executes."""

    recipe: Recipe
    recipe_path: Path
    artifacts: Path
    nodes: list[Node]
    family: str | None
    problem: str | None = None  # why the graph stops at download (e.g. offline)
    remote: RemoteCache | None = None
    verify_hashes: bool = False  # every cache hit hashes all its files (no fast path)

    @property
    def cache(self) -> LocalCache:
        return LocalCache(self.artifacts / "cache", self.remote, verify_hashes=self.verify_hashes)

    @property
    def build_dir(self) -> Path:
        return self.artifacts / "builds" / self.recipe.name


def is_inpainting_source(source: dict) -> bool:
    """Whether the resolved checkpoint's unet is a 9-channel inpainting unet (latents, mask, masked-image latents)."""
    if source.get("kind") == "single_file":
        return bool(source.get("inpainting"))
    config = Path(source.get("path") or "") / "unet" / "config.json"
    if source.get("kind") == "synthetic" or not config.is_file():
        return False
    return json.loads(config.read_text()).get("in_channels") == INPAINT_CHANNELS


def family_of_source(source: dict) -> str:
    """The name of the resolved checkpoint's family (``sdbuild.families``): ``sd``, ``sdxl``, ``sdxl-refiner``…"""
    from sdbuild.families import family_of_source as entry

    return entry(source).name


def prepare(
    recipe_path: str | Path,
    artifacts: Path = DEFAULT_ARTIFACTS,
    overrides: dict | None = None,
    *,
    strict: bool = True,
    remote: RemoteCache | None = None,
    with_analysis: bool = False,
) -> Build:
    """Load and validate the recipe, resolve the checkpoint, build and key the graph.

    ``overrides`` maps dotted recipe keys to values (a matrix variant).
    With ``strict=False`` a checkpoint that cannot be resolved (no network)
    leaves a graph that stops at download, with ``problem`` saying why.
    ``remote`` is a shared cache consulted after the local one.
    """
    from sdbuild.stages.download import DownloadError, resolve_adapters, resolve_source

    recipe_path = Path(recipe_path)
    # Digests of the user's big input files are remembered beside the cache, by stat (cache.input_digest).
    remember_input_digests(Path(artifacts) / "cache" / STATE / "inputs.json")
    recipe = load_recipe(recipe_path, overrides)
    check_buildable(recipe, recipe_path)
    check_local_sources(recipe, recipe_path)
    m = recipe.model
    try:
        source = resolve_source(m.version, m.revision, m.variant, m.allow_pickle, prediction_type=m.prediction_type)
        if m.custom_vae:
            # A VAE folder or hub repo (config.json at its top), in the download key: the VAE
            # components, and everything downstream of the download, follow it.
            vae = resolve_source(m.custom_vae, "main", None, m.allow_pickle, key="model.custom_vae", single=True)
            if vae["kind"] == "synthetic":
                raise DownloadError("model.custom_vae: synthetic models are whole pipelines; give a VAE folder or hub id")
            source = {**source, "custom_vae": vae}
        source = resolve_adapters(source, m.loras, m.embeddings, m.allow_pickle)
        family = family_of_source(source)
        refiner = resolve_refiner(recipe, family)
    except DownloadError as e:
        if strict:
            raise
        node = Node(STAGES["download"], None, fields=read_fields(recipe, STAGES["download"].fields, {"source": None}))
        return Build(recipe, recipe_path, Path(artifacts), [node], None, problem=str(e), remote=remote)
    controlnets = resolve_controlnets(recipe, family)
    from sdbuild.stages.compile import compiler_available, compiler_version

    compiler = compiler_version() if compiler_available() else None
    nodes = build_graph(recipe, source, family, recipe_path.parent, with_analysis, controlnets, compiler, refiner)
    assign_keys(nodes)
    return Build(recipe, recipe_path, Path(artifacts), nodes, family, remote=remote)


def resolve_refiner(recipe: Recipe, family: str) -> dict | None:
    """The recipe's ``model.refiner`` resolved like the checkpoint (hub, folder, single file or synthetic), or None.

    Refused, one line, when the base is not SDXL base or the refiner is not an SDXL refiner.
    """
    from sdbuild.stages.download import resolve_source

    m = recipe.model
    if not m.refiner:
        return None
    bases = [f for f in FAMILIES.values() if f.refiner]
    if FAMILIES[family].refiner is None:
        followed = " or ".join(f.label for f in bases)
        raise RecipeError(
            f"model.refiner: the base model.version is {FAMILIES[family].label}; a refiner follows {followed}"
            " (or build the refiner alone as model.version)"
        )
    source = resolve_source(m.refiner, "main", None, m.allow_pickle, key="model.refiner")
    found = family_of_source(source)
    if found != FAMILIES[family].refiner:
        wanted = FAMILIES[FAMILIES[family].refiner].label
        raise RecipeError(f"model.refiner: {m.refiner} is {FAMILIES[found].label}, not {wanted}")
    return source


def resolve_controlnets(recipe: Recipe, family: str) -> dict[str, dict]:
    """The recipe's ControlNets resolved like the checkpoint (hub, folder or synthetic)."""
    from sdbuild.errors import NotBuiltYet
    from sdbuild.stages.download import resolve_source

    if recipe.controlnet and not FAMILIES[family].controlnet:
        from sdbuild.models.controlnet import SDXL_REFUSAL  # imports torch: only on this refusal

        raise NotBuiltYet(f"controlnet: {SDXL_REFUSAL}")
    m = recipe.model
    return {
        name: resolve_source(name, "main", None, m.allow_pickle, key=f"controlnet[{i}]", single=True)
        for i, name in enumerate(recipe.controlnet)
    }


def variants_of(recipe_path: str | Path, variant: str | None = None) -> list[tuple[str, dict]]:
    """The (name, overrides) to build for a recipe: all its matrix variants, or the one named."""
    from sdbuild.recipe import expand_matrix

    variants = expand_matrix(recipe_path)
    if variant is None:
        return variants
    chosen = [v for v in variants if v[0] == variant]
    if not chosen:
        raise UsageError(f"--variant: {recipe_path} has no variant '{variant}'; it has {', '.join(n for n, _ in variants)}")
    return chosen


@dataclass
class PlanRow:
    stage: str
    component: str | None
    key: str | None
    status: str  # cached | stale | to build | not built yet | skipped: … | needs network
    detail: str = ""


def plan_rows(build: Build) -> list[PlanRow]:
    """What a run would do, stage by stage, without doing it."""
    from sdbuild.stages.compile import compiler_available

    rows = []
    for node in build.nodes:
        if node.key is None:
            rows.append(PlanRow(node.stage.name, node.component, None, "needs network", build.problem or ""))
            continue
        if node.stage.publishes:
            # Not a cache entry: no key shown. Taken over from the previous build laid out with the same key (if unedited).
            status = "cached" if _published_key(build.build_dir) == node.key else "to build"
            rows.append(PlanRow(node.stage.name, node.component, None, status, f"artifacts/builds/{build.recipe.name}"))
            continue
        status = build.cache.status(node.stage.name, node.key)
        detail = "changed since last checked: the run re-hashes it and rebuilds it if bad" if status == "stale" else ""
        rows.append(PlanRow(node.stage.name, node.component, node.key, status, detail))
    if build.problem:
        rows.append(PlanRow("trace, convert, …", None, None, "pending", "after download"))
        return rows
    if not compiler_available():
        rows.append(PlanRow("compile", None, None, "skipped", "needs macOS with Xcode tools; bundle keeps .mlpackage"))
    # verify rows are keyed nodes: move them after bundle, where they belong in ORDER.
    rows.sort(key=lambda r: ORDER.index(r.stage) if r.stage in ORDER else ORDER.index("convert"))
    return rows


class Reporter:
    """Hooks a front end uses to show progress; the default shows nothing."""

    def stage_started(self, node: Node) -> None: ...

    def stage_finished(self, node: Node) -> None: ...

    def note(self, line: str) -> None: ...


@dataclass
class BuildResult:
    build_dir: Path
    report: dict


def run_build(
    build: Build,
    *,
    force: tuple[str, ...] = (),
    until: str | None = None,
    only: str | None = None,
    reporter: Reporter | None = None,
    jobs: int | None = None,
) -> BuildResult:
    """Build every stage (cache hits reused), then the bundle; write build.json and build.log.

    Stages whose inputs are ready run side by side, up to ``jobs`` at once
    (default: the number of cores) while their estimated peaks fit in the
    available memory. ``only``: the nodes of that stage and what they consume,
    nothing else (``sdbuild analyze``: no trace or convert).
    """
    reporter = reporter or Reporter()
    limit = _last_stage_index(force, only or until)
    wanted = _upstream_of([n for n in build.nodes if n.stage.name == only]) if only else None
    started = time.time()
    log = _new_build_log(build)
    build.cache.sweep()  # temporary folders of killed runs; never a live run's
    sweep_build_temps(build.artifacts / "builds")
    todo = []
    for node in build.nodes:
        if ORDER.index(node.stage.name) > limit or (wanted is not None and id(node) not in wanted):
            node.status = "skipped"
        elif not at_publish(node.stage):
            todo.append(node)
    bundle = next((n for n in build.nodes if n.stage.publishes and n.status != "skipped"), None)
    if bundle is None:
        build_stages(build, todo, force, log, reporter, jobs)
        notes, psnr = _checked_psnr(build, limit, log, reporter)
        report = build_report(build, started, notes, psnr)
        report["seconds"] = round(time.time() - started, 3)
        return BuildResult(build.build_dir, report)
    check_tokenizer(build)
    report = publish_bundle(build, bundle, todo, limit, log, reporter, started, force=force, jobs=jobs)
    return BuildResult(build.build_dir, report)


def check_tokenizer(build: Build) -> None:
    """Refuse, before any stage runs, a checkpoint folder without the tokenizer the bundle ships (one line)."""
    from sdbuild.stages.bundle import tokenizer_dir
    from sdbuild.stages.download import DownloadError

    source = build.nodes[0].fields.get("source") or {}
    if source.get("kind") in ("folder", "hub"):
        try:
            tokenizer_dir(Path(source["path"]))
        except DownloadError as e:
            raise DownloadError(f"model.version: {e}") from None


def _upstream_of(nodes: list[Node]) -> set[int]:
    """The ids of ``nodes`` and of every node they consume, directly or not."""
    seen: set[int] = set()
    while nodes:
        node = nodes.pop()
        if id(node) not in seen:
            seen.add(id(node))
            nodes.extend(node.deps)
    return seen


def _checked_psnr(build: Build, limit: int, log: Path, reporter: Reporter) -> tuple[list[str], dict[str, dict]]:
    """The report's notes and each verified component's figures; SdbuildError where a PSNR is below the recipe's gate."""
    notes: list[str] = []
    psnr = {n.component: _psnr(n) for n in build.nodes if n.stage.name == "verify" and n.entry}
    _note_skipped_device_work(psnr, limit, notes, reporter)
    check_psnr(build, psnr, log)
    return notes, psnr


def _last_stage_index(force: tuple[str, ...], until: str | None) -> int:
    """Where ``--until`` stops (the last stage otherwise); unknown stage names are a usage error."""
    for name in force:
        if name not in ORDER:
            raise UsageError(f"--force: unknown stage '{name}'; stages are {', '.join(ORDER)}")
    if until is not None and until not in ORDER:
        raise UsageError(f"--until: unknown stage '{until}'; stages are {', '.join(ORDER)}")
    return ORDER.index(until) if until else len(ORDER) - 1


def _new_build_log(build: Build) -> Path:
    logs = build.artifacts / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{build.recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    log.touch()
    return log


def _psnr(node: Node) -> dict:
    from sdbuild.stages.verify import read_psnr

    return read_psnr(node.entry.path)


def build_stages(build: Build, todo: list[Node], force: tuple[str, ...], log: Path, reporter: Reporter, jobs: int | None,
                 lay_out: Callable[[Node], None] | None = None) -> None:
    """Take each of ``todo`` from the cache or build it, side by side where inputs and memory allow.

    A node that ``publishes`` (the bundle) is not a cache entry: ``lay_out(node)`` makes it.
    """
    import psutil

    cache = build.cache
    to_build = [n for n in todo if not n.stage.publishes and (n.stage.name in force or cache.get(n.stage.name, n.key) is None)]
    if to_build:
        start_stage_server({n.stage.name for n in to_build})  # it imports their libraries while the cache is checked
    estimates, estimated = PeakEstimates(cache), {}

    def estimate(node: Node) -> int:
        if node not in estimated:
            estimated[node] = estimates.peak(node.stage.name, node.component, input_bytes(node)) if node in to_build else 0
        return estimated[node]

    def run_node(node: Node) -> None:
        begun = time.time()
        if node.stage.publishes:
            lay_out(node)
            return
        # A whole-build stage's deps may include skipped ones (--until): it reads none of them.
        ready = [d for d in node.deps if d.entry is not None]
        upstream = {**node.files, **{d.stage.name: d.entry.path for d in ready}}
        # By stage and component too, where a node follows one stage for several components (calibrate).
        upstream.update({f"{d.stage.name}:{d.component}": d.entry.path for d in ready if d.component})
        upstream.update(read_through(node))
        scratch = cache.root / ".scratch" / f"{node.stage.name}-{node.key}" if node.stage.resumable else None
        if scratch is not None:
            scratch.mkdir(parents=True, exist_ok=True)
        job = Job(node.stage.name, node.component, node.fields, upstream, build.recipe.name, scratch)

        def produce(tmp: Path) -> dict:
            # A log of its own while stages run side by side; appended to the build's log after.
            part = log.with_name(f"{log.stem}.{node.stage.name}-{node.key}.log")
            try:
                facts = run_in_child(node.stage.run, job, tmp, part)
            except BaseException:
                _append_log(log, node, part, keep=True)  # the error names this file
                raise
            _append_log(log, node, part)
            facts["input_bytes"] = input_bytes(node)  # what later estimates of this stage compare sizes by
            return facts

        entry, how = cache.build(node.stage.name, node.key, produce, node.record, force=node.stage.name in force)
        node.entry, node.status = entry, {"hit": "cached", "remote": "downloaded", "miss": "built"}[how]
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        node.seconds = entry.manifest.get("seconds", 0.0)
        node.peak_rss_bytes = entry.manifest.get("peak_rss_bytes", 0)
        node.window = (begun, time.time())

    def started(node: Node) -> None:
        if not node.stage.publishes:  # the bundle is shown as the build's last line, not as a stage
            reporter.stage_started(node)

    def finished(node: Node, error: BaseException | None) -> None:
        if error is not None:
            node.status = "failed"
        if not node.stage.publishes:
            reporter.stage_finished(node)

    gate = MemoryGate(psutil.virtual_memory().available)
    schedule(todo, run_node, jobs=jobs or default_jobs(), gate=gate, estimate=estimate, started=started, finished=finished,
             waits_for=lambda node: waits_for(node, todo))


def waits_for(node: Node, nodes: list[Node]) -> list[Node]:
    """The nodes ``node`` reads, so starts after: what it consumes that comes before it in build order,
    and the nodes of ``nodes`` of the stages it comes ``after``.

    Every stage consumes earlier stages only, but for the bundle and its sample, whose keys hold
    every verify (a later stage) without reading its output: they start while verify runs.
    """
    consumed = [d for d in node.deps if ORDER.index(d.stage.name) < ORDER.index(node.stage.name)]
    return consumed + [n for n in nodes if n.stage.name in node.stage.after]


def shipped_package(build: Build, component: str) -> dict[str, Any]:
    """What ``component`` ships, by the stages' declarations: ``whole``, its package (``PACKAGE_OF``:
    the Python layout's, what verify checks), and ``swift``, what of it ships (``SHIPPED``: the
    chunks where chunked, else the package), compiled where compile ran."""
    from sdbuild.stages.chunk import part_paths
    from sdbuild.stages.compile import compiled_paths
    from sdbuild.stages.convert import PACKAGE

    nodes = by_component(build.nodes)[component]
    whole = PACKAGE_OF.first(nodes).entry.path / PACKAGE
    shipped = SHIPPED.first(nodes)
    swift = part_paths(shipped.entry.path) if shipped.stage.name == "chunk" else [whole]
    compiled = nodes.get("compile")
    if compiled is not None and compiled.entry is not None:
        swift = compiled_paths(compiled.entry.path, compiled.entry.manifest)
    return {"swift": swift, "whole": whole}


def build_report(build: Build, started: float, notes: list[str], psnr: dict[str, dict]) -> dict:
    """build.json's content for the stages just taken or built: keys, timings, peaks, sizes, PSNRs.

    ``notes`` is the report's own list (lines added later land in it); ``psnr``: each verified component's figures.
    """
    from sdbuild.stages.chunk import chunk_facts

    report = {
        "name": build.recipe.name,
        "recipe_file": str(build.recipe_path),
        "recipe": build.recipe.model_dump(mode="json"),
        "family": build.family,
        "sdbuild": __version__,
        "platform": f"{platform.system()} {platform.machine()}",
        "versions": library_versions(("torch", "coremltools", "diffusers", "transformers", "numpy")),
        "stages": [
            {
                "stage": n.stage.name,
                "component": n.component,
                "key": n.key,
                "status": n.status,
                "cache": {"cached": "hit", "downloaded": "remote", "built": "miss"}.get(n.status, n.status),
                "seconds": n.seconds if n.status == "built" else 0.0,
                "build_seconds": n.seconds,
                "peak_rss_bytes": n.peak_rss_bytes if n.status == "built" else 0,
                "bytes": n.entry.manifest.get("bytes") if n.entry else None,
                # Seconds from the run's start: stages built side by side overlap.
                "ran_s": [round(t - started, 2) for t in n.window] if n.window else None,
            }
            for n in build.nodes
            if not n.stage.publishes  # the bundle is reported under "bundle"
        ],
        "components": {},
        "notes": notes,
    }
    for comp, node in final_nodes(build.nodes).items():
        if node.entry is None:
            continue
        convert = next(n for n in build.nodes if n.component == comp and n.stage.name == "convert")
        report["components"][comp] = {
            "package_bytes": tree_bytes(node.entry.path / "model.mlpackage"),
            "float16_bytes": tree_bytes(convert.entry.path / "model.mlpackage"),
            "compressed": node.stage.name == "compress",
        }
        if comp in psnr:
            report["components"][comp]["psnr"] = {k: round(v, 2) for k, v in psnr[comp].items() if k.endswith("psnr_db")}
            if "functions" in psnr[comp]:  # one per resolution
                report["components"][comp]["psnr_by_function"] = {
                    name: {k: round(v, 2) for k, v in figures.items() if k.endswith("psnr_db")}
                    for name, figures in psnr[comp]["functions"].items()
                }
        chunk = next((n for n in build.nodes if n.stage.name == "chunk" and n.component == comp and n.entry), None)
        if chunk is not None:
            facts = chunk_facts(chunk.entry.path)
            report["components"][comp]["chunks"] = {
                "parts": [{"weight_bytes": p["weight_bytes"], "package_bytes": p["package_bytes"]} for p in facts["parts"]],
                "crossing": [c["crossing_tensors"] for c in facts["cuts"]],
            }
    analyze = next((n for n in build.nodes if n.stage.name == "analyze" and n.entry), None)
    if analyze is not None and (analyze.entry.path / "analysis.png").is_file():
        report["compression_plot"] = str(analyze.entry.path / "analysis.png")
    return report


def _note_skipped_device_work(psnr: dict, limit: int, notes: list[str], reporter: Reporter) -> None:
    """One line each for what needs macOS and was skipped: the device PSNR, the compiler."""
    from sdbuild.stages.compile import SKIP_REASON, compiler_available
    from sdbuild.stages.verify import DEVICE_SKIPPED

    if psnr and any("note" in p for p in psnr.values()):
        notes.append(DEVICE_SKIPPED)
        reporter.note(DEVICE_SKIPPED)
    if limit >= ORDER.index("compile") and not compiler_available():
        notes.append(SKIP_REASON)
        reporter.note(SKIP_REASON)


def check_psnr(build: Build, psnr: dict, log: Path) -> None:
    """Refuse the bundle where a component's PSNR is below the recipe's minimum, or chained chunks drift."""
    minimum = build.recipe.verify.psnr_min_db
    for comp, figures in psnr.items():
        if figures.get("chain_psnr_db", CHAIN_MIN_DB) < CHAIN_MIN_DB:
            raise SdbuildError(
                f"verify {comp}: the chained chunks differ from the whole package: {figures['chain_psnr_db']:.1f} dB "
                f"(fp32) is below {CHAIN_MIN_DB} dB; the bundle was not written"
            )
        if figures["psnr_db"] < minimum:
            raise SdbuildError(
                f"verify {comp}: PSNR {figures['psnr_db']:.1f} dB against the float32 reference is below "
                f"verify.psnr_min_db {minimum:g} dB; the bundle was not written (figures in {log})"
            )


def publish_bundle(build: Build, bundle: Node, todo: list[Node], limit: int, log: Path, reporter: Reporter,
                   started: float, *, force: tuple[str, ...] = (), jobs: int | None = None) -> dict:
    """Build ``todo`` and lay out the bundle (or take the previous one over, same key) in staging as soon
    as the packages it holds are built, while verify runs; run the stages that come after it (the
    sample image) from there; once every verify passed its PSNR gate, add the report and log and
    publish the bundle under the build's name by a rename. Returns the report (``build_report`` plus the bundle's facts).

    The bundle and what comes after it wait for the nodes they consume that come before them in
    build order (``ORDER``) only: verify comes after, and enters their keys without being read.
    """
    from sdbuild.report import write_report

    download = build.nodes[0]
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{build.recipe.name}-p{os.getpid()}-", dir=_mkdir(build.build_dir.parent)))
    laid_out: dict[str, Any] = {}

    def lay_out(node: Node) -> None:
        packages = {comp: shipped_package(build, comp) for comp in final_nodes(build.nodes)}
        # --force bundle lays it out anew, as --force does any stage.
        reused = None if bundle.stage.name in force else _reuse_bundle(build.build_dir, bundle.key, staging)
        if reused is None:
            _write_bundle(build, bundle, packages, download.entry.path, staging, log)
        bundle.status = "built" if reused is None else "cached"
        laid_out["files"] = _bundle_files(staging, reused)

    try:
        after = [n for n in build.nodes if bundle.stage.name in n.stage.after and n.status != "skipped"]
        for node in after:
            node.files = {**node.files, bundle.stage.name: staging}  # read, not keyed (``Stage.after``)
        build_stages(build, [*todo, bundle, *after], force, log, reporter, jobs, lay_out=lay_out)
        seconds, size = round(time.time() - started, 3), tree_bytes(staging)
        notes, psnr = _checked_psnr(build, limit, log, reporter)
        report = build_report(build, started, notes, psnr)
        report["bundle"] = {"key": bundle.key, "files": laid_out["files"]}
        report["seconds"] = seconds
        report["bundle_bytes"] = size
        sample = next((n for n in after if n.stage.name == "sample"), None)
        if sample is not None:
            facts = sample.entry.manifest["sample_image"]
            shutil.copyfile(sample.entry.path / facts["path"], staging / facts["path"])
            report["sample_image"] = facts
        if report.get("compression_plot"):
            # The bundle keeps its own copy: the cache entry may be collected.
            shutil.copyfile(report["compression_plot"], staging / "compression.png")
            report["compression_plot"] = "compression.png"
        write_json_atomic(staging / "build.json", report)
        shutil.copyfile(log, staging / "build.log")
        write_report(staging)
        faults.point("bundle", "bundle")
        _publish_dir(staging, build.build_dir)
        return report
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        full = as_disk_full(e)
        if full is not None:
            # The bundle, report or build.json met a full disk: one line, nothing published.
            raise DiskFullError(disk_full_line(full, build.build_dir), full) from None
        raise


def _write_bundle(build: Build, bundle: Node, packages: dict, download_entry: Path, staging: Path, log: Path) -> None:
    """The bundle stage's function (``write_bundle``) into ``staging``: in a process forked from the
    stage server where this run started one, else here (a run that built nothing has none, and
    would wait for its imports).

    Rewriting the package specs needs coremltools' protobuf classes, and
    importing them imports all of coremltools and torch: several seconds in
    this process, none in the server's child, which has them loaded.
    """
    fields = {"recipe": build.recipe, "family": build.family, "packages": packages, "download": str(download_entry)}
    job = Job(bundle.stage.name, None, fields, {}, build.recipe.name)
    if not stage_server_running():
        from sdbuild.stages.bundle import run

        run(job, staging)
        return
    # A log of its own, as every stage's: verify may still be running beside it.
    part = log.with_name(f"{log.stem}.{bundle.stage.name}-{bundle.key}.log")
    try:
        run_in_child(bundle.stage.run, job, staging, part)
    except BaseException:
        _append_log(log, bundle, part, keep=True)  # the error names this file
        raise
    _append_log(log, bundle, part)


BUNDLE_FILES_EXCLUDED = ("build.json", "build.log", "report.html", "report.md")  # rewritten by every run


def _file_state(path: Path) -> list[int]:
    """Size, mtime, ctime and inode: any write to the file changes one of them (ctime cannot be set back)."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _bundle_files(folder: Path, known: dict | None = None) -> dict[str, list]:
    """The state and sha256 of each file ``write_bundle`` wrote under ``folder``, by relative path.

    ``known``: the records of files copied from a previous bundle, whose sha256 is not computed again.
    """
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in BUNDLE_FILES_EXCLUDED:
            old = (known or {}).get(rel)
            sha = old[4] if isinstance(old, list) and len(old) == 5 else sha256_file(p)
            out[rel] = [*_file_state(p), sha]
    return out


def _published_key(build_dir: Path) -> str | None:
    """The bundle key the build folder was last published with (None: none, or unreadable)."""
    try:
        return (json.loads((build_dir / "build.json").read_text()).get("bundle") or {}).get("key")
    except (OSError, ValueError):
        return None


def _reuse_bundle(previous: Path, key: str, staging: Path) -> dict | None:
    """Link the previous build's bundle files into ``staging`` if it was written with ``key``; its file records if done, else None.

    A warm run thus rewrites no package spec (which would import coremltools).
    The previous build must still hold every file it listed, each in the state
    recorded when it was written (size, mtime, ctime, inode): a bundle file
    edited since is not taken over, and the bundle is written anew from the cache.
    """
    try:
        old = json.loads((previous / "build.json").read_text()).get("bundle") or {}
    except (OSError, ValueError):
        return None
    files = old.get("files") or {}
    if old.get("key") != key or not files:
        return None
    for rel, record in files.items():
        path = previous / rel
        if path.is_symlink() or not path.is_file() or not isinstance(record, list) or len(record) != 5:
            return None
        # A file whose stat moved (opened and saved by a tool, say) is taken over only if its bytes are the same.
        if _file_state(path) != record[:4] and sha256_file(path) != record[4]:
            return None
    from sdbuild.stages.bundle import _link

    for rel in files:
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        _link(previous / rel, staging / rel)
    return files


_log_lock = threading.Lock()  # stages finishing side by side append one at a time


def _append_log(log: Path, node: Node, part: Path, keep: bool = False) -> None:
    """Append a stage's own log to the build's, under a header naming it; ``keep`` leaves the part."""
    text = part.read_text(errors="replace") if part.is_file() else ""
    with _log_lock, open(log, "a") as f:
        f.write(f"\n=== {node.label} ({node.key})\n{text}")
    if not keep:
        part.unlink(missing_ok=True)


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _publish_dir(staging: Path, final: Path) -> None:
    """Replace ``final`` by ``staging`` with renames; the old build is removed only after.

    Two runs of one recipe may publish at once: whoever finds ``final`` taken
    moves it aside and tries again.
    """
    for _ in range(5):
        try:
            staging.rename(final)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        old = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-p{os.getpid()}-", dir=final.parent))
        try:
            final.rename(old / "build")
        except FileNotFoundError:
            pass  # the other run moved it first
        shutil.rmtree(old, ignore_errors=True)
    staging.rename(final)
