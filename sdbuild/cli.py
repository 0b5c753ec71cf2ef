"""The command line: parse, call one library function, render the result."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from sdbuild.errors import SdbuildError
from sdbuild.report import human_bytes


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


class RichReporter:
    """Progress for a build: a spinner line per stage and component."""

    def __init__(self, console):
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = console
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=False)
        self.tasks = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def stage_started(self, node):
        self.tasks[id(node)] = self.progress.add_task(f"{node.label}", total=1)

    def stage_finished(self, node):
        task = self.tasks[id(node)]
        word = {"cached": "[green]cached[/]", "built": "[cyan]built[/]", "failed": "[red]failed[/]"}.get(node.status, node.status)
        self.progress.update(task, description=f"{node.label}: {word}", completed=1)

    def note(self, line):
        self.progress.console.print(f"[yellow]note:[/] {line}")


def cmd_run(args) -> int:
    from rich.table import Table

    from sdbuild.executor import prepare, run_build, start_stage_server_if_cold, variants_of
    from sdbuild.recipe import check_variants

    console = _console()
    err = _console(stderr=True)
    remote = _remote(args, lambda line: err.print(f"[yellow]warning:[/] {line}", soft_wrap=True))
    results = []
    for recipe in args.recipe:
        check_variants(recipe)  # every recipe and variant is valid before any work starts
    start_stage_server_if_cold(Path(args.artifacts), remote)
    todo = [(recipe, overrides) for recipe in args.recipe for _, overrides in variants_of(recipe, args.variant)]
    for recipe, overrides in todo:
        build = prepare(recipe, Path(args.artifacts), overrides, remote=remote)
        build.verify_hashes = args.verify_hashes
        if args.json:
            result = run_build(build, force=tuple(args.force or ()), until=args.until, jobs=args.jobs)
        else:
            with RichReporter(console) as reporter:
                result = run_build(build, force=tuple(args.force or ()), until=args.until, reporter=reporter, jobs=args.jobs)
        results.append(result)
        if not args.json:
            table = Table(title=f"{build.recipe.name}: {result.report['seconds']:.1f} s")
            for col in ("stage", "component", "cache", "seconds", "peak RSS", "size"):
                table.add_column(col, justify="right" if col in ("seconds", "peak RSS", "size") else "left")
            for row in result.report["stages"]:
                table.add_row(
                    row["stage"],
                    row["component"] or "",
                    row["cache"],
                    f"{row['seconds']:.1f}" if row["cache"] == "miss" else "",
                    human_bytes(row["peak_rss_bytes"]) if row["cache"] == "miss" else "",
                    human_bytes(row["bytes"]),
                )
            console.print(table)
            console.print(f"bundle: {result.build_dir}")
    for page in _matrix_comparisons(args, todo, results):
        if not args.json:
            console.print(f"comparison: {page}", soft_wrap=True, highlight=False)
    if args.json:
        print(json.dumps([r.report for r in results], indent=2))
    return 0


def _matrix_comparisons(args, todo, results) -> list[Path]:
    """After a full build of a matrix recipe's variants: ``<artifacts>/compare/<recipe name>.html``.

    Each variant's JSON report names the page under ``comparison``.
    """
    from sdbuild.compare import write_compare
    from sdbuild.recipe import load_recipe

    if args.until is not None:
        return []  # no bundles to compare
    by_recipe: dict[str, list] = {}
    for (recipe, _), result in zip(todo, results):
        by_recipe.setdefault(recipe, []).append(result)
    pages = []
    for recipe, built in by_recipe.items():
        if len(built) < 2:
            continue
        page = write_compare([r.build_dir for r in built], Path(args.artifacts) / "compare" / f"{load_recipe(recipe).name}.html")
        for r in built:
            r.report["comparison"] = str(page)
        pages.append(page)
    return pages


def cmd_compare(args) -> int:
    from sdbuild.compare import write_compare

    page = write_compare([Path(b) for b in args.build], Path(args.output))
    print(page)
    return 0


def _remote(args, warn):
    """The remote cache named by --cache-url or SDBUILD_CACHE_URL, if any."""
    from sdbuild.cache import RemoteCache

    url = args.cache_url or os.environ.get("SDBUILD_CACHE_URL")
    return RemoteCache(url, require=args.require_remote_cache, warn=warn) if url else None


def cmd_analyze(args) -> int:
    from sdbuild.executor import prepare, run_build

    build = prepare(args.recipe, Path(args.artifacts), with_analysis=True)
    console = _console()
    if args.json:
        run_build(build, only="analyze")
    else:
        with RichReporter(console) as reporter:
            run_build(build, only="analyze", reporter=reporter)
    node = next(n for n in build.nodes if n.stage.name == "analyze")
    analysis = node.entry.path / "analysis.json"
    doc = json.loads(analysis.read_text())
    if args.json:
        print(json.dumps({"analysis": str(analysis), "plot": str(node.entry.path / "analysis.png"), "baselines": doc.get("baselines")}, indent=2))
        return 0
    from rich.table import Table

    table = Table(title=f"mixed-bit pre-analysis: {doc.get('model_version')}")
    table.add_column("recipe")
    table.add_column("PSNR (dB)", justify="right")
    for name, value in doc.get("baselines", {}).items():
        table.add_row(name, f"{value:.1f}" if isinstance(value, (int, float)) else str(value))
    console.print(table)
    console.print(f"analysis: {analysis}")
    console.print(f"plot: {node.entry.path / 'analysis.png'}")
    return 0


def cmd_plan(args) -> int:
    from rich.table import Table

    from sdbuild.executor import plan_rows, prepare
    from sdbuild.recipe import check_variants

    check_variants(args.recipe)  # the errors run would give, before it starts
    build = prepare(args.recipe, Path(args.artifacts), strict=False)
    rows = plan_rows(build)
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
        return 0
    table = Table(title=f"plan: {build.recipe.name}")
    for col in ("stage", "component", "status", "key", "detail"):
        table.add_column(col)
    colors = {"cached": "green", "to build": "cyan", "stale": "red", "needs network": "red"}
    for r in rows:
        color = colors.get(r.status, "yellow")
        table.add_row(r.stage, r.component or "", f"[{color}]{r.status}[/]", r.key or "", r.detail)
    _console().print(table)
    return 0


def cmd_schema(args) -> int:
    from sdbuild.recipe import recipe_schema

    print(json.dumps(recipe_schema(), indent=2))
    return 0


def cmd_matrix(args) -> int:
    from sdbuild.recipe import expand_matrix
    from sdbuild.stages import runner_stages

    variants = []
    for recipe in args.recipe:
        for name, overrides in expand_matrix(recipe):
            variants.append(
                {
                    "name": name,
                    "recipe": recipe,
                    "overrides": overrides,
                    "command": f"sdbuild run {recipe} --variant {name}",
                    # From the stages' declarations: compiling and Core ML checks need a Mac.
                    "runners": runner_stages(),
                }
            )
    if args.json:
        print(json.dumps(variants, indent=2))
    else:
        for v in variants:
            print(f"{v['name']}\t{v['recipe']}")
    return 0


def cmd_exec(args) -> int:
    from sdbuild.mil.executor import exec_files

    result = exec_files(Path(args.model), Path(args.inputs), Path(args.output), precision=args.precision, profile=args.profile)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    console = _console()
    for name, shape in result.get("outputs", {}).items():
        console.print(f"{name}: {shape}")
    if result.get("profile"):
        from rich.table import Table

        table = Table(title="time per op type")
        table.add_column("op")
        table.add_column("seconds", justify="right")
        for op, seconds in sorted(result["profile"].items(), key=lambda kv: -kv[1]):
            table.add_row(op, f"{seconds:.4f}")
        console.print(table)
    console.print(f"wrote {args.output}")
    return 0


def cmd_cache(args) -> int:
    from sdbuild.cache import LocalCache

    cache = LocalCache(Path(args.artifacts) / "cache")
    console = _console()
    if args.action == "ls":
        entries = cache.entries()
        if args.json:
            print(json.dumps([{"stage": e.stage, "key": e.key, "bytes": e.manifest.get("bytes"), "component": e.manifest.get("fields", {}).get("component")} for e in entries], indent=2))
        for e in entries if not args.json else []:
            console.print(f"{e.stage:9} {e.key}  {e.manifest.get('fields', {}).get('component') or '':15} {human_bytes(e.manifest.get('bytes'))}")
        return 0
    if args.action == "verify":
        problems = cache.verify()
        for entry, what in problems:
            name = entry if isinstance(entry, str) else f"{entry.stage}/{entry.key}"
            console.print(f"[red]bad[/] {name}: {what}", soft_wrap=True)
        console.print(f"{len(cache.entries())} entries, {len(problems)} bad")
        return 1 if problems else 0
    if args.action == "gc":
        keep = set()
        for build_json in (Path(args.artifacts) / "builds").glob("*/build.json"):
            for row in json.loads(build_json.read_text()).get("stages", []):
                if row.get("key"):
                    keep.add((row["stage"], row["key"]))
        from sdbuild.cache import sweep_build_temps

        count, freed = cache.gc(keep)
        freed += sweep_build_temps(Path(args.artifacts) / "builds")
        console.print(f"removed {count} entries not used by any build and the temporary folders of finished runs, {human_bytes(freed)} freed")
        return 0
    return 2


def cmd_generate(args) -> int:
    from sdbuild.generate import GenerateRequest, run_generate
    from sdbuild.torch_cache import private_torch_cache

    # The parsed flags are the request's fields, by name (--output-dir is output_dir, …).
    with private_torch_cache():  # generation imports diffusers here, in this process
        result = run_generate(GenerateRequest.from_namespace(args, progress=not args.json))
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    console = _console()
    for note in result.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")
    for path in result["images"]:
        console.print(f"wrote {path}")
    return 0


def cmd_inspect(args) -> int:
    from sdbuild.inspect import inspect_path, render_inspection

    facts = inspect_path(Path(args.path))
    if args.json:
        print(json.dumps(facts, indent=2, default=str))
    else:
        render_inspection(facts, _console())
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line and exit status 2, like every other input error."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got '{text}'")
    return int(text)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sdbuild", description="Build Core ML Stable Diffusion bundles from YAML recipes.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="build recipes")
    run.add_argument("recipe", nargs="+")
    run.add_argument("--artifacts", default="artifacts")
    run.add_argument("--force", action="append", metavar="STAGE", help="rebuild this stage even if cached")
    run.add_argument("--until", metavar="STAGE", help="stop after this stage")
    run.add_argument("--jobs", "-j", type=_positive_int, metavar="N", help="stages run at once, memory allowing (default: the number of cores)")
    run.add_argument("--variant", metavar="NAME", help="build one variant of a matrix recipe (default: all)")
    run.add_argument("--cache-url", metavar="URL", help="remote stage cache, any fsspec URL (or SDBUILD_CACHE_URL)")
    run.add_argument("--require-remote-cache", action="store_true", help="fail instead of going local-only when the remote is down")
    run.add_argument("--verify-hashes", action="store_true", help="hash every file of every cache hit (default: only files whose size, mtime or inode changed)")
    run.add_argument("--json", action="store_true")
    run.set_defaults(func=cmd_run)

    plan = sub.add_parser("plan", help="what would run and what is cached")
    plan.add_argument("recipe")
    plan.add_argument("--artifacts", default="artifacts")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=cmd_plan)

    analyze = sub.add_parser("analyze", help="mixed-bit palettization pre-analysis of a recipe's unet")
    analyze.add_argument("recipe")
    analyze.add_argument("--artifacts", default="artifacts")
    analyze.add_argument("--json", action="store_true")
    analyze.set_defaults(func=cmd_analyze)

    compare = sub.add_parser("compare", help="one HTML page with builds side by side: sizes, PSNR, samples, size-vs-PSNR chart")
    compare.add_argument("build", nargs="+", help="build folders (artifacts/builds/<name>)")
    compare.add_argument("-o", "--output", default="compare.html", help="the page to write (default: compare.html)")
    compare.set_defaults(func=cmd_compare)

    matrix = sub.add_parser("matrix", help="expand recipes into variants")
    matrix.add_argument("recipe", nargs="+")
    matrix.add_argument("--json", action="store_true")
    matrix.set_defaults(func=cmd_matrix)

    ex = sub.add_parser("exec", help="run an .mlpackage on the CPU with the reference executor")
    ex.add_argument("model")
    ex.add_argument("--inputs", required=True)
    ex.add_argument("--output", required=True)
    ex.add_argument("--precision", choices=("fp16", "fp32"), default="fp16")
    ex.add_argument("--profile", action="store_true")
    ex.add_argument("--json", action="store_true")
    ex.set_defaults(func=cmd_exec)

    gen = sub.add_parser("generate", help="make images from a bundle")
    gen.add_argument("--bundle", required=True, help="a build folder, its Resources/, or a folder of Python-layout packages")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--seed", type=int, default=93)
    gen.add_argument("--steps", type=int, default=50)
    gen.add_argument("--guidance-scale", type=float, default=7.5)
    gen.add_argument("--scheduler", default="DDIM")
    gen.add_argument("--rng", choices=("numpy", "torch"), default="numpy")
    gen.add_argument("--image-count", type=int, default=1)
    gen.add_argument("--image", help="start image for image-to-image")
    gen.add_argument("--strength", type=float, default=None, help="default: 0.75 for image-to-image, 1 for inpainting")
    gen.add_argument("--mask", help="inpainting mask (white: repaint), with --image and an inpainting bundle")
    gen.add_argument("--compute-unit", default=None, help="Core ML compute unit (macOS); default: the bundle's hint")
    gen.add_argument("--controlnet", nargs="+", metavar="NAME")
    gen.add_argument("--controlnet-inputs", nargs="+", metavar="IMAGE")
    gen.add_argument("--controlnet-scale", type=float, default=1.0)
    gen.add_argument("--height", type=int, default=None, help="image height: one of the bundle's sizes (default: its first)")
    gen.add_argument("--width", type=int, default=None, help="image width: one of the bundle's sizes (default: its first)")
    gen.add_argument(
        "--refiner-start", type=float, default=0.8,
        help="with an SDXL refiner in the bundle: the fraction of steps the base runs before the refiner takes over (Apple's default 0.8; 1: base only)",
    )
    gen.add_argument("-o", "--output-dir", default=".")
    gen.add_argument("--json", action="store_true")
    gen.set_defaults(func=cmd_generate)

    insp = sub.add_parser("inspect", help="inputs, outputs, sizes, op counts and compression of a bundle or package")
    insp.add_argument("path")
    insp.add_argument("--json", action="store_true")
    insp.set_defaults(func=cmd_inspect)

    schema = sub.add_parser("schema", help="print the recipe JSON schema")
    schema.set_defaults(func=cmd_schema)

    cache = sub.add_parser("cache", help="list, verify or clean the stage cache")
    cache.add_argument("action", choices=("ls", "verify", "gc"))
    cache.add_argument("--artifacts", default="artifacts")
    cache.add_argument("--json", action="store_true")
    cache.set_defaults(func=cmd_cache)
    return p


def quiet_libraries() -> None:
    """Keep the libraries' import-time chatter (untested-version notices, missing macOS
    frameworks, tracer warnings) off the user's terminal: our own lines say what matters."""
    import logging
    import warnings

    for name in ("coremltools", "transformers", "diffusers", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*TracerWarning.*")


def _end_on_sigterm(signum, frame):
    """SIGTERM (a CI job cancelled, `kill`): remove this process's temporary folders, then end as the
    signal would have ended it. (Stages and the stage server end with it: their parent-death signal.)"""
    from sdbuild.executor import tidy_temp_folders

    tidy_temp_folders()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    args = parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _end_on_sigterm) if main_thread else None
    try:
        return args.func(args)
    except SdbuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        # The machine, not the input: a full disk, a folder that cannot be written.
        from sdbuild.cache import DISK_FULL, disk_full_line

        import shutil

        where = e.filename or args.__dict__.get("artifacts") or "."
        if isinstance(e, shutil.Error) and e.args and isinstance(e.args[0], list) and e.args[0]:
            _src, where, why = e.args[0][0]  # copytree's list of failures: the first says enough
            line = f"{where}: {why}"
        else:
            line = disk_full_line(e, where) if e.errno in DISK_FULL else f"{where}: {e.strerror or str(e) or type(e).__name__}"
        print(f"error: {line}", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
