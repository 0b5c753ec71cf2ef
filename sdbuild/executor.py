"""The stage graph of a build: planning, scheduling, child processes.

For each component: trace → convert → compress → compile, after one
download; then bundle (and verify) over them all. Keys come from each stage's
declaration (sdbuild/stages/__init__.py): its name and version, the recipe
fields it reads, its upstream keys, the versions of the libraries it uses and
a digest of its own source.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import multiprocessing
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sdbuild import __version__
from sdbuild.cache import Entry, LocalCache, RemoteCache, stage_key, tree_bytes, write_json_atomic
from sdbuild.errors import SdbuildError
from sdbuild.recipe import Recipe, check_buildable, load_recipe
from sdbuild.stages import ORDER, STAGES, Job, Stage

DEFAULT_ARTIFACTS = Path("artifacts")
CHAIN_MIN_DB = 60.0  # chunking must not change the numbers: chained parts vs the whole, fp32


# --- keys --------------------------------------------------------------------

_digests: dict[str, str] = {}


def library_versions(names: tuple[str, ...]) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def code_digest(modules: tuple[str, ...]) -> str:
    """sha256 over the source of the listed sdbuild modules (a package counts all its files)."""
    h = hashlib.sha256()
    for name in sorted(modules):
        if name not in _digests:
            spec = importlib.util.find_spec(name)
            if spec is None or spec.origin is None:
                raise RuntimeError(f"stage code {name} not found")
            origin = Path(spec.origin)
            files = sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]
            d = hashlib.sha256()
            for f in files:
                d.update(f.name.encode() + b"\0" + f.read_bytes())
            _digests[name] = d.hexdigest()
        h.update(name.encode() + _digests[name].encode())
    return h.hexdigest()[:16]


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
    seconds: float = 0.0
    peak_rss_bytes: int = 0

    @property
    def label(self) -> str:
        return f"{self.stage.name} {self.component}" if self.component else self.stage.name


def read_fields(recipe: Recipe, names: tuple[str, ...], extra: dict[str, Any]) -> dict[str, Any]:
    return {n: extra[n] if n in extra else recipe.get(n) for n in names}


def components_of(recipe: Recipe, family: str) -> list[str]:
    from sdbuild.models import DEFAULT_COMPONENTS

    return list(recipe.components or DEFAULT_COMPONENTS[family])


def pre_analysis_fields(recipe: Recipe, recipe_dir: Path) -> dict[str, Any]:
    """A pre-analysis file named by the recipe enters the compress key by its content."""
    from sdbuild.cache import sha256_file

    name = recipe.compression.mixed_bit.pre_analysis
    if name == "auto":
        return {}
    path = (recipe_dir / name).resolve()
    if not path.is_file():
        raise SdbuildError(
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
) -> list[Node]:
    """Nodes in dependency order. ``source`` is what the download resolved to.

    Per component: trace → convert → (analyze) → compress → chunk, then a
    verify over what ships. ``with_analysis`` adds the unet's mixed-bit
    pre-analysis even when the recipe's compression does not use it
    (``sdbuild analyze``). ``controlnets`` maps each of the recipe's
    ControlNets to its resolved source; with any, the controlled unet is built
    beside the plain one. ``compiler`` is coremlcompiler's version where it
    exists (macOS): then every shipped package is compiled too.
    """
    download = Node(STAGES["download"], None, fields=read_fields(recipe, STAGES["download"].fields, {"source": source}))
    nodes = [download]
    comp = recipe.compression
    compressed = set(comp.components) if comp else set()
    mixed_bit = comp is not None and comp.mixed_bit is not None
    if mixed_bit:
        compressed &= {"unet"}  # the pre-analysis measures the unet; other components stay float16
    analyze = None
    if with_analysis or (mixed_bit and comp.mixed_bit.pre_analysis == "auto"):
        analyze = Node(STAGES["analyze"], "unet", [download])
    shipped: dict[str, list[Node]] = {}
    unets = ["unet"] + (["controlled_unet"] if recipe.controlnet else [])
    components = components_of(recipe, family)
    if recipe.controlnet and "unet" in components:
        components.insert(components.index("unet") + 1, "controlled_unet")
    for component in components:
        trace = Node(STAGES["trace"], component, [download])
        convert = Node(STAGES["convert"], component, [trace])
        chain = [trace, convert]
        if component == "unet" and analyze is not None:
            nodes.append(analyze)
        if component in compressed or (component == "controlled_unet" and "unet" in compressed):
            deps = [convert] + ([analyze] if mixed_bit and analyze is not None else [])
            chain.append(Node(STAGES["compress"], component, deps))
        if component in unets and recipe.chunk is not None:
            chain.append(Node(STAGES["chunk"], component, [chain[-1]]))
        nodes += chain
        shipped[component] = chain
    for name, source in (controlnets or {}).items():
        component = f"controlnet/{name}"
        fetch = Node(STAGES["download"], component, fields={"source": source})
        trace = Node(STAGES["trace"], component, [fetch])
        chain = [trace, Node(STAGES["convert"], component, [trace])]
        if "controlnet" in compressed and not mixed_bit:
            chain.append(Node(STAGES["compress"], component, [chain[-1]]))
        nodes += [fetch, *chain]
        shipped[component] = chain
    for component, chain in shipped.items():
        nodes.append(Node(STAGES["verify"], component, chain))
    if compiler is not None:
        for component, chain in shipped.items():
            node = Node(STAGES["compile"], component, [chain[-1]])
            node.fields = {"coremlcompiler": compiler}
            nodes.append(node)
    for node in nodes[1:]:
        if node.stage.name in ("download", "compile"):
            continue  # a ControlNet's download reads its own source only; compile, the compiler's version
        extra = pre_analysis_fields(recipe, recipe_dir) if node.stage.name == "compress" and mixed_bit else {}
        node.fields = read_fields(recipe, node.stage.fields_for(node.component) + tuple(extra), extra)
    return nodes


def assign_keys(nodes: list[Node]) -> None:
    for node in nodes:
        s = node.stage
        # By stage and component: a node may follow several of one stage (sample follows every verify).
        upstream = {f"{d.stage.name}:{d.component or ''}": d.key for d in node.deps}
        versions = library_versions(s.libraries)
        version = f"{s.version}+{code_digest(s.code)}"
        fields = dict(node.fields, component=node.component)
        node.key = stage_key(s.name, version, fields, upstream, versions)
        node.record = {"stage_version": version, "fields": fields, "upstream": upstream, "versions": versions}


def final_nodes(nodes: list[Node]) -> dict[str, Node]:
    """The last package-producing node of each component."""
    out: dict[str, Node] = {}
    for node in nodes:
        if node.component and node.stage.name in ("convert", "compress"):
            out[node.component] = node
    return out


# --- child processes ---------------------------------------------------------


def _set_parent_death_signal() -> None:
    # A child must not outlive a killed build: it would keep working for nobody.
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _child_main(run: str, job: Job, out: str, log: str, conn) -> None:
    _set_parent_death_signal()
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        result = _call_stage(run, job, Path(out))
        conn.send(("ok", result))
    except SdbuildError as e:
        conn.send(("user", e.exit_code, str(e)))
    except BaseException as e:  # report, with the traceback in the log
        traceback.print_exc()
        conn.send(("crash", type(e).__name__, str(e).strip().splitlines()[0] if str(e).strip() else ""))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _call_stage(run: str, job: Job, out: Path) -> dict:
    import importlib

    module, name = run.split(":")
    result = getattr(importlib.import_module(module), name)(job, out) or {}
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    result.setdefault("self_peak_rss_bytes", peak + peak_children)
    return result


class _TreeMemory(threading.Thread):
    """Samples the RSS of a process and all its children; keeps the peak of the sum."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop_event = threading.Event()

    def run(self):
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop_event.is_set():
            try:
                total = root.memory_info().rss
                for child in root.children(recursive=True):
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


def run_in_child(run: str, job: Job, out: Path, log: Path) -> dict:
    """Run a stage function in a fresh process; its memory goes back when it ends.

    Returns the stage's facts plus ``peak_rss_bytes`` of the child's process tree.
    """
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(run, job, str(out), str(log), send), daemon=False)
    proc.start()
    send.close()
    memory = _TreeMemory(proc.pid)
    memory.start()
    try:
        message = receive.recv()
    except EOFError:
        message = None
    proc.join()
    peak = memory.stop()
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

    @property
    def cache(self) -> LocalCache:
        return LocalCache(self.artifacts / "cache", self.remote)

    @property
    def build_dir(self) -> Path:
        return self.artifacts / "builds" / self.recipe.name


def family_of_source(source: dict) -> str:
    from sdbuild.models import model_family

    if source["kind"] == "synthetic":
        return "sdxl" if "sdxl" in source["name"] else "sd"
    if source["kind"] == "single_file":
        return "sdxl" if source["family"].startswith("sdxl") else "sd"
    return model_family(Path(source["path"]))


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
    recipe = load_recipe(recipe_path, overrides)
    check_buildable(recipe, recipe_path)
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
    except DownloadError as e:
        if strict:
            raise
        node = Node(STAGES["download"], None, fields=read_fields(recipe, STAGES["download"].fields, {"source": None}))
        return Build(recipe, recipe_path, Path(artifacts), [node], None, problem=str(e), remote=remote)
    family = family_of_source(source)
    controlnets = resolve_controlnets(recipe, family)
    from sdbuild.stages.compile import compiler_available, compiler_version

    compiler = compiler_version() if compiler_available() else None
    nodes = build_graph(recipe, source, family, recipe_path.parent, with_analysis, controlnets, compiler)
    assign_keys(nodes)
    return Build(recipe, recipe_path, Path(artifacts), nodes, family, remote=remote)


def resolve_controlnets(recipe: Recipe, family: str) -> dict[str, dict]:
    """The recipe's ControlNets resolved like the checkpoint (hub, folder or synthetic)."""
    from sdbuild.errors import NotBuiltYet
    from sdbuild.models.controlnet import SDXL_REFUSAL
    from sdbuild.stages.download import resolve_source

    if recipe.controlnet and family == "sdxl":
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
        raise SdbuildError(f"--variant: {recipe_path} has no variant '{variant}'; it has {', '.join(n for n, _ in variants)}")
    return chosen


@dataclass
class PlanRow:
    stage: str
    component: str | None
    key: str | None
    status: str  # cached | to build | not built yet | skipped: … | needs network
    detail: str = ""


def plan_rows(build: Build) -> list[PlanRow]:
    """What a run would do, stage by stage, without doing it."""
    from sdbuild.stages.compile import compiler_available

    rows = []
    for node in build.nodes:
        if node.key is None:
            rows.append(PlanRow(node.stage.name, node.component, None, "needs network", build.problem or ""))
            continue
        cached = build.cache.get(node.stage.name, node.key) is not None
        rows.append(PlanRow(node.stage.name, node.component, node.key, "cached" if cached else "to build"))
    if build.problem:
        rows.append(PlanRow("trace, convert, …", None, None, "pending", "after download"))
        return rows
    if not compiler_available():
        rows.append(PlanRow("compile", None, None, "skipped", "needs macOS with Xcode tools; bundle keeps .mlpackage"))
    rows.append(PlanRow("bundle", None, None, "to build", f"artifacts/builds/{build.recipe.name}"))
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
    reporter: Reporter | None = None,
) -> BuildResult:
    """Build every stage (cache hits reused), then the bundle; write build.json and build.log."""
    from sdbuild.report import write_report
    from sdbuild.stages.bundle import write_bundle
    from sdbuild.stages.chunk import chunk_facts, part_paths
    from sdbuild.stages.compile import compiled_paths
    from sdbuild.stages.compile import SKIP_REASON, compiler_available
    from sdbuild.stages.verify import DEVICE_SKIPPED, read_psnr

    reporter = reporter or Reporter()
    for name in force:
        if name not in ORDER:
            raise SdbuildError(f"--force: unknown stage '{name}'; stages are {', '.join(ORDER)}")
    if until is not None and until not in ORDER:
        raise SdbuildError(f"--until: unknown stage '{until}'; stages are {', '.join(ORDER)}")
    limit = ORDER.index(until) if until else len(ORDER) - 1
    started = time.time()
    logs = build.artifacts / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{build.recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    log.touch()
    cache = build.cache
    notes: list[str] = []
    for node in build.nodes:
        if ORDER.index(node.stage.name) > limit:
            node.status = "skipped"
            continue
        upstream = {d.stage.name: d.entry.path for d in node.deps}
        scratch = cache.root / ".scratch" / f"{node.stage.name}-{node.key}" if node.stage.resumable else None
        if scratch is not None:
            scratch.mkdir(parents=True, exist_ok=True)
        job = Job(node.stage.name, node.component, node.fields, upstream, build.recipe.name, scratch)
        reporter.stage_started(node)

        def produce(tmp: Path, node=node, job=job) -> dict:
            with open(log, "a") as f:
                f.write(f"\n=== {node.label} ({node.key})\n")
            return run_in_child(node.stage.run, job, tmp, log)

        try:
            entry, how = cache.build(node.stage.name, node.key, produce, node.record, force=node.stage.name in force)
        except SdbuildError:
            node.status = "failed"
            reporter.stage_finished(node)
            raise
        node.entry, node.status = entry, {"hit": "cached", "remote": "downloaded", "miss": "built"}[how]
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        node.seconds = entry.manifest.get("seconds", 0.0)
        node.peak_rss_bytes = entry.manifest.get("peak_rss_bytes", 0)
        reporter.stage_finished(node)

    finals = final_nodes(build.nodes)
    psnr = {n.component: read_psnr(n.entry.path) for n in build.nodes if n.stage.name == "verify" and n.entry}
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
            }
            for n in build.nodes
        ],
        "components": {},
        "notes": notes,
    }
    for comp, node in finals.items():
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
    if psnr and any("note" in p for p in psnr.values()):
        notes.append(DEVICE_SKIPPED)
        reporter.note(DEVICE_SKIPPED)

    if limit >= ORDER.index("compile") and not compiler_available():
        notes.append(SKIP_REASON)
        reporter.note(SKIP_REASON)
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
    if limit < ORDER.index("bundle"):
        report["seconds"] = round(time.time() - started, 3)
        return BuildResult(build.build_dir, report)

    download = build.nodes[0]
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{build.recipe.name}-", dir=_mkdir(build.build_dir.parent)))
    try:
        packages = {}
        for comp, node in finals.items():
            whole = node.entry.path / "model.mlpackage"
            chunk = next((n for n in build.nodes if n.stage.name == "chunk" and n.component == comp), None)
            compiled = next((n for n in build.nodes if n.stage.name == "compile" and n.component == comp and n.entry), None)
            swift = part_paths(chunk.entry.path) if chunk else [whole]
            if compiled is not None:
                swift = compiled_paths(compiled.entry.path, compiled.entry.manifest)
            packages[comp] = {"swift": swift, "whole": whole}
        write_bundle(build.recipe, build.family, packages, download.entry.path, staging)
        report["seconds"] = round(time.time() - started, 3)
        report["bundle_bytes"] = tree_bytes(staging)
        if build.recipe.verify.sample_image:
            report["sample_image"] = _sample_image(build, staging, log, reporter, report)
        if report.get("compression_plot"):
            # The bundle keeps its own copy: the cache entry may be collected.
            shutil.copyfile(report["compression_plot"], staging / "compression.png")
            report["compression_plot"] = "compression.png"
        write_json_atomic(staging / "build.json", report)
        shutil.copyfile(log, staging / "build.log")
        write_report(staging)
        _publish_dir(staging, build.build_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return BuildResult(build.build_dir, report)


def sample_node(build: Build) -> Node:
    """The report's sample image, keyed after every shipped model's verify."""
    node = Node(STAGES["sample"], None, [n for n in build.nodes if n.stage.name == "verify"])
    node.fields = read_fields(build.recipe, node.stage.fields, {})
    assign_keys([node])
    return node


def _sample_image(build: Build, bundle: Path, log: Path, reporter: Reporter, report: dict) -> dict:
    """Generate (or take from the cache) the report's sample image; copy it into ``bundle``.

    Its key follows every shipped model's verify key, so it is a function of
    exactly the packages the bundle holds; the bundle folder itself is only
    where the stage reads them from.
    """
    node = sample_node(build)
    job = Job("sample", None, node.fields, {"bundle": bundle}, build.recipe.name)
    reporter.stage_started(node)

    def produce(tmp: Path) -> dict:
        with open(log, "a") as f:
            f.write(f"\n=== sample ({node.key})\n")
        return run_in_child(node.stage.run, job, tmp, log)

    entry, how = build.cache.build("sample", node.key, produce, node.record)
    node.status = {"hit": "cached", "remote": "downloaded", "miss": "built"}[how]
    reporter.stage_finished(node)
    report["stages"].append(
        {"stage": "sample", "component": None, "key": node.key, "status": node.status, "cache": how,
         "seconds": entry.seconds if how == "miss" else 0.0, "build_seconds": entry.seconds,
         "peak_rss_bytes": entry.manifest.get("peak_rss_bytes", 0) if how == "miss" else 0,
         "bytes": entry.manifest.get("bytes")}
    )
    facts = entry.manifest["sample_image"]
    shutil.copyfile(entry.path / facts["path"], bundle / facts["path"])
    return facts


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _publish_dir(staging: Path, final: Path) -> None:
    """Replace ``final`` by ``staging`` with renames; the old build is removed only after."""
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(final)
