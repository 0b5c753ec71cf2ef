"""The executor's scheduler and stage processes, with fake stages (no model is built here)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from helpers import REPO
from sdbuild.cache import pid_alive
from sdbuild.executor import MemoryGate, Node, PeakEstimates, schedule
from sdbuild.stages import STAGES


def fake_nodes(*specs: tuple[str, list[str]]) -> dict[str, Node]:
    """Nodes named by their component, with dependencies by name."""
    nodes: dict[str, Node] = {}
    for name, deps in specs:
        nodes[name] = Node(STAGES["trace"], name, [nodes[d] for d in deps])
    return nodes


class Recorder:
    """A run_node that holds each stage for a moment and records what ran beside what."""

    def __init__(self, hold: float = 0.2, fail: str | None = None, holds: dict[str, float] | None = None):
        self.hold, self.fail, self.holds = hold, fail, holds or {}
        self.lock = threading.Lock()
        self.running: set[str] = set()
        self.together: set[frozenset[str]] = set()
        self.order: list[tuple[str, str]] = []
        self.max_running = 0

    def __call__(self, node: Node) -> None:
        with self.lock:
            self.running.add(node.component)
            self.order.append(("start", node.component))
            self.max_running = max(self.max_running, len(self.running))
            for other in self.running - {node.component}:
                self.together.add(frozenset((node.component, other)))
        time.sleep(self.holds.get(node.component, self.hold))
        with self.lock:
            self.running.discard(node.component)
            self.order.append(("end", node.component))
        if node.component == self.fail:
            raise RuntimeError(f"{node.component} failed")


def test_independent_stages_run_together_and_dependencies_wait():
    nodes = fake_nodes(("download", []), ("a", ["download"]), ("b", ["download"]), ("a2", ["a"]), ("b2", ["b"]))
    run = Recorder()
    schedule(list(nodes.values()), run, jobs=4, gate=MemoryGate(10 * 2**30), estimate=lambda n: 1)
    assert frozenset(("a", "b")) in run.together  # independent chains overlap
    for node, dep in (("a", "download"), ("b", "download"), ("a2", "a"), ("b2", "b")):
        assert run.order.index(("start", node)) > run.order.index(("end", dep))


def test_jobs_bounds_how_many_run_at_once():
    nodes = fake_nodes(*((c, []) for c in "abcdef"))
    run = Recorder(hold=0.1)
    schedule(list(nodes.values()), run, jobs=2, gate=MemoryGate(10 * 2**30), estimate=lambda n: 1)
    assert run.max_running == 2
    assert len([e for e in run.order if e[0] == "end"]) == 6


def test_memory_gate_holds_stages_back_when_estimates_do_not_fit():
    # 10 units available: two big stages (6 each) never run together, nor beside
    # the medium one (5); the small one (3) fits beside a big one.
    nodes = fake_nodes(("big1", []), ("big2", []), ("medium", []), ("small", []))
    need = {"big1": 6, "big2": 6, "medium": 5, "small": 3}
    run = Recorder()
    gate = MemoryGate(10)
    schedule(list(nodes.values()), run, jobs=4, gate=gate, estimate=lambda n: need[n.component])
    assert frozenset(("big1", "big2")) not in run.together
    assert frozenset(("big1", "medium")) not in run.together and frozenset(("big2", "medium")) not in run.together
    assert frozenset(("big1", "small")) in run.together
    assert len([e for e in run.order if e[0] == "end"]) == 4 and gate.reserved == 0


def test_a_stage_larger_than_memory_still_runs_alone():
    nodes = fake_nodes(("huge", []), ("other", []))
    run = Recorder(hold=0.05)
    schedule(list(nodes.values()), run, jobs=2, gate=MemoryGate(10), estimate=lambda n: 50)
    assert run.max_running == 1 and len(run.order) == 4


def test_failure_stops_new_starts_and_lets_running_stages_finish():
    nodes = fake_nodes(("download", []), ("bad", ["download"]), ("slow", ["download"]), ("after_bad", ["bad"]), ("after_slow", ["slow"]))
    run = Recorder(fail="bad", holds={"slow": 1.0})  # still running when "bad" fails, at 0.2 s, even on a busy machine
    with pytest.raises(RuntimeError, match="bad failed"):
        schedule(list(nodes.values()), run, jobs=2, gate=MemoryGate(100), estimate=lambda n: 1)
    assert ("end", "slow") in run.order  # ran beside the failing stage and was not abandoned
    assert ("start", "after_bad") not in run.order and ("start", "after_slow") not in run.order


def test_estimate_is_the_last_measured_peak_of_that_stage_kind_and_size(tmp_path):
    from sdbuild.cache import LocalCache

    cache = LocalCache(tmp_path)
    rows = [("a" * 24, "unet", 1000, 5000, "2026-01-01T00:00:00Z"), ("b" * 24, "unet", 1100, 7000, "2026-01-02T00:00:00Z"),
            ("c" * 24, "unet", 10**9, 9 * 10**9, "2026-01-03T00:00:00Z")]
    for key, component, size, peak, created in rows:
        entry = tmp_path / "trace" / key
        entry.mkdir(parents=True)
        manifest = {"key": key, "files": {}, "fields": {"component": component}, "input_bytes": size, "peak_rss_bytes": peak, "created": created}
        (entry / "manifest.json").write_text(json.dumps(manifest))
    estimates = PeakEstimates(cache)
    assert estimates.peak("trace", "unet", 1050) == 7000  # the newest of the two of that size
    assert estimates.peak("trace", "unet", 10**9) == 9 * 10**9
    table = estimates.peak("trace", "unet", 10**7)  # no measurement of that size: the table, above the weights
    assert table > 10**7 and estimates.peak("trace", "vae_decoder", 1000) > 2**30


# --- stage processes ----------------------------------------------------------

PROBE = """
import json, sys
from pathlib import Path
from sdbuild.executor import run_in_child
from sdbuild.stages import Job

def main():
    out, log, calls = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    results = []
    for run, fields in calls:
        try:
            env = {"TMPDIR": str(out)} if fields.get("tmpdir") else None
            stage = fields.pop("stage", "fake")  # a real stage's name: the server imports what that one uses
            results.append(run_in_child(run, Job(stage, None, fields, {}), out, log, env))
        except Exception as e:
            results.append({"error": str(e)})
    print(json.dumps(results))

if __name__ == "__main__":
    main()
"""


def run_probe(tmp_path: Path, calls: list, env: dict | None = None, **popen) -> subprocess.Popen:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    (tmp_path / "out").mkdir(exist_ok=True)
    paths = os.pathsep.join([str(REPO), str(REPO / "tests")])
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "out"), str(tmp_path / "stage.log"), json.dumps(calls)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": paths, **(env or {})}, **popen,
    )


def test_stages_fork_from_a_server_that_imported_the_libraries(tmp_path):
    calls = [("stage_fakes:report", {}), ("stage_fakes:allocate", {"mib": 256}), ("stage_fakes:report", {}), ("stage_fakes:crash", {}),
             ("stage_fakes:report", {"tmpdir": True}), ("stage_fakes:pool", {})]
    proc = run_probe(tmp_path, calls)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    first, big, after, crashed, survivor, pooled = json.loads(out)
    assert first["preloaded"] == ["coremltools", "diffusers", "torch", "transformers"]
    assert first["ppid"] != proc.pid and first["ppid"] == after["ppid"] == survivor["ppid"]  # one server, every stage its own process
    # The libraries' objects were set aside from the collector before the stage forked (server_ready's gc.freeze).
    assert first["frozen_objects"] > 100_000 and first["gc_enabled"], first  # and the stage collects its own
    # coremltools imported without scikit-learn (server._import_coremltools_without_sklearn), which a stage can still import.
    assert not first["sklearn_imported"] and first["sklearn_importable"], first
    assert len({first["pid"], after["pid"], survivor["pid"]}) == 3
    # Peaks are each stage's own: 256 MiB more where it was allocated, not carried into the next stage.
    assert big["peak_rss_bytes"] >= big["rss_bytes"] + 250 * 2**20
    assert after["peak_rss_bytes"] < after["rss_bytes"] + 64 * 2**20
    # A crashed stage is reported and loses nothing else: the next stage forks from the same server.
    assert "died, exit status 3" in crashed["error"]
    assert "preloaded" in survivor
    # The environment a stage is given holds in the forked process (the server's was fixed at its start).
    assert survivor["tmpdir"] == str(tmp_path / "out") and first["tmpdir"] != survivor["tmpdir"]
    # A stage may start worker pools of its own from a forkserver of its own (the k-means workers do).
    assert pooled["squares"] == [0, 1, 4, 9, 16] and pooled["worker_pids"] >= 1
    # Nothing the libraries print on import reaches the terminal.
    assert "coremltools" not in err and "scikit-learn" not in err, err


def test_a_tmpdir_too_long_for_a_socket_path_still_gets_the_stage_server(tmp_path):
    """CI's xdist tmp_path made the forkserver's socket path longer than 107 bytes: bind failed."""
    long_tmp = tmp_path / ("t" * 60) / ("m" * 60)
    long_tmp.mkdir(parents=True)
    proc = run_probe(tmp_path, [("stage_fakes:report", {}), ("stage_fakes:pool", {})], env={"TMPDIR": str(long_tmp)})
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    first, pooled = json.loads(out)
    assert first["preloaded"] == ["coremltools", "diffusers", "torch", "transformers"], first  # forked, not spawned
    assert first["tmpdir"] == str(long_tmp)  # the stage's own temp files still go to TMPDIR
    assert pooled["squares"] == [0, 1, 4, 9, 16]  # a stage's own pool too
    assert list(long_tmp.iterdir()) == []


def test_servers_starting_together_leave_the_shared_inductor_folder_alone(tmp_path, monkeypatch):
    """``import diffusers`` makes torch's ``torchinductor_<user>`` folder in TMPDIR; two servers starting at
    once each removed it or kept it by what the other had done. A server now never touches that folder."""
    import getpass

    # torch writes the folder it uses into the environment: a test process that imported diffusers has it set.
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    shared = tmp_path / "tmp"
    shared.mkdir()
    # Where that folder would go, a file: a server that made or used it would fail to import diffusers.
    obstacle = shared / ("torchinductor_" + getpass.getuser())
    obstacle.write_text("someone else's")
    probes = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        probes.append(run_probe(tmp_path / name, [("stage_fakes:report", {})], env={"TMPDIR": str(shared)}))
    for proc in probes:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        (result,) = json.loads(out)
        assert result["preloaded"] == ["coremltools", "diffusers", "torch", "transformers"], result  # forked
        assert result["inductor_dir"] is None  # the server's own folder is not handed on to stages
    assert sorted(p.name for p in shared.iterdir()) == [obstacle.name] and obstacle.read_text() == "someone else's"


def test_spawn_workers_start_fresh_interpreters(tmp_path):
    proc = run_probe(tmp_path, [("stage_fakes:report", {})], env={"SDBUILD_WORKERS": "spawn"})
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    (result,) = json.loads(out)
    assert result["preloaded"] == [] and result["ppid"] == proc.pid


def test_killed_build_ends_its_stage_processes(tmp_path):
    import psutil

    pid_file = tmp_path / "stage.pid"
    proc = run_probe(tmp_path, [("stage_fakes:sleep_forever", {"pid_file": str(pid_file)})])
    deadline = time.time() + 600
    while not pid_file.exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    stage = psutil.Process(int(pid_file.read_text()))
    server = psutil.Process(stage.ppid())
    os.kill(proc.pid, signal.SIGKILL)  # the build alone, not its process group
    proc.communicate()
    gone, alive = psutil.wait_procs([stage, server], timeout=30)
    assert not alive, [p.pid for p in alive]


def test_a_server_imports_what_its_stages_use_and_grows_when_a_later_stage_needs_more(tmp_path):
    """A build that traces only starts a server without coremltools; a convert after it (no stage running)
    gets a server with both stages' modules; a trace after that forks from the same, larger one."""
    calls = [("stage_fakes:report", {"stage": "trace"}), ("stage_fakes:report", {"stage": "convert"}),
             ("stage_fakes:report", {"stage": "trace"})]
    proc = run_probe(tmp_path, calls)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    traced, converted, again = json.loads(out)
    assert traced["preloaded"] == ["diffusers", "torch", "transformers"], traced
    assert not traced["sklearn_imported"]
    assert converted["preloaded"] == ["coremltools", "diffusers", "torch", "transformers"], converted
    assert converted["ppid"] != traced["ppid"] and again["ppid"] == converted["ppid"]
    assert again["preloaded"] == converted["preloaded"]
    assert not pid_alive(traced["ppid"])  # the first server was ended, not left beside the second


def test_server_preload_is_the_stages_own_in_the_servers_order():
    from sdbuild.executor import SERVER_OWN_PRELOAD, STAGE_SERVER_PRELOAD, server_preload
    from sdbuild.stages import STAGES

    assert server_preload() == list(STAGE_SERVER_PRELOAD) == server_preload(["trace", "no such stage"])
    for stage in STAGES.values():
        assert set(stage.preload) <= set(STAGE_SERVER_PRELOAD), stage.name  # one it does not know would be skipped
    compress = server_preload(["compress"])
    assert "coremltools" in compress and "diffusers" not in compress and "sdbuild.models.unet" not in compress
    assert compress[0] == "sdbuild.stages.server" and compress[-1] == "sdbuild.stages.server_ready"
    assert set(SERVER_OWN_PRELOAD) <= set(compress)
    both = server_preload(["compress", "trace"])
    assert set(both) == set(compress) | set(server_preload(["trace"]))
    assert both == [name for name in STAGE_SERVER_PRELOAD if name in both]  # the server's order, whatever the stages'


def test_every_module_the_stage_server_preloads_exists():
    # multiprocessing skips a preload module that fails to import without a word: a renamed
    # diffusers module would only make every stage slower again.
    import importlib.util

    from sdbuild.executor import STAGE_SERVER_PRELOAD

    missing = [name for name in STAGE_SERVER_PRELOAD if importlib.util.find_spec(name) is None]
    assert missing == []


def test_bundle_and_sample_wait_for_the_packages_not_for_verify():
    """The bundle and its sample image consume every verify (their keys) but read none: they run while verify runs."""
    from sdbuild.executor import prepare, waits_for

    build = prepare(REPO / "recipes" / "tiny.yaml", Path("/nonexistent-artifacts"))
    by = {n.label: n for n in build.nodes}
    bundle, sample = by["bundle"], by["sample"]
    verifies = [n for n in build.nodes if n.stage.name == "verify"]
    assert verifies and all(v in bundle.deps and v in sample.deps for v in verifies)  # keyed by them
    assert set(waits_for(bundle, build.nodes)) == {n for n in bundle.deps if n.stage.name != "verify"}
    assert by["compress unet"] in waits_for(bundle, build.nodes)
    assert waits_for(sample, build.nodes) == [bundle]
    # Every other stage waits for all it consumes.
    assert all(waits_for(n, build.nodes) == n.deps for n in build.nodes if n not in (bundle, sample))


def test_sample_runs_beside_verify_and_the_bundle_after_the_packages():
    from sdbuild.executor import waits_for

    nodes = fake_nodes(("convert", []), ("verify", ["convert"]), ("bundle", ["convert", "verify"]), ("sample", ["verify"]))
    stage_of = {"convert": "convert", "verify": "verify", "bundle": "bundle", "sample": "sample"}
    for name, node in nodes.items():
        node.stage = STAGES[stage_of[name]]
    run = Recorder(holds={"verify": 1.0})
    order = list(nodes.values())
    schedule(order, run, jobs=4, gate=MemoryGate(10 * 2**30), estimate=lambda n: 1, waits_for=lambda n: waits_for(n, order))
    assert frozenset(("verify", "sample")) in run.together
    assert run.order.index(("start", "bundle")) > run.order.index(("end", "convert"))
    assert run.order.index(("start", "sample")) > run.order.index(("end", "bundle"))


@pytest.mark.parametrize("cache, remote, starts", [(False, False, True), (True, False, False), (False, True, False)])
def test_stage_server_starts_before_planning_only_where_nothing_can_be_cached(tmp_path, monkeypatch, cache, remote, starts):
    import sdbuild.executor as executor

    started = []
    monkeypatch.setattr(executor, "start_stage_server", lambda: started.append(1))
    if cache:
        (tmp_path / "cache").mkdir()
    executor.start_stage_server_if_cold(tmp_path, object() if remote else None)
    assert bool(started) == starts


ORPHAN_PROBE = r"""
import ctypes, json, os, subprocess, sys
ctypes.CDLL("libc.so.6").prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: the server, orphaned, is ours to wait for
starter = subprocess.Popen([sys.executable, "-c", "import os; from sdbuild.executor import start_stage_server; start_stage_server(); os._exit(0)"])
cpu = {}
while True:
    try:
        pid, _, usage = os.wait4(-1, 0)
    except ChildProcessError:
        break
    cpu["starter" if pid == starter.pid else "server"] = usage.ru_utime + usage.ru_stime
print(json.dumps(cpu))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a child subreaper is Linux's")
def test_a_stage_server_whose_build_ended_before_it_started_imports_nothing(tmp_path):
    """A build that stops at once (an error found in planning) ends before its server is up: the server
    must not go on importing the libraries (several CPU-seconds) for nobody."""
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN_PROBE)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    cpu = json.loads(done.stdout)
    assert set(cpu) == {"starter", "server"}
    assert cpu["server"] < 1.0, cpu  # importing torch and coremltools alone takes more than 2 CPU-s


def test_a_build_that_ends_while_its_server_imports_leaves_nothing_in_tmpdir(tmp_path, monkeypatch):
    """A recipe refused in planning, into a fresh artifacts folder: the stage server started before
    planning and was still importing the libraries when the build ended. The folder it had made in
    TMPDIR for torch (server.py) was left there, one per such run."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # the build's own, as a user's shell has none
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    recipe = tmp_path / "x.yaml"
    recipe.write_text("model: {version: synthetic:tiny-sdxl}\ncontrolnet: [synthetic:tiny-controlnet]\n")
    code = (
        "import sys\n"
        "from sdbuild.cli import main\n"
        "from sdbuild.executor import stage_server_running\n"
        "rc = main(sys.argv[1:])\n"
        "assert stage_server_running(), 'no server: nothing to test'\n"
        "sys.exit(rc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "run", str(recipe), "--artifacts", str(tmp_path / "art")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 2 and "SDXL ControlNets are not supported" in done.stderr, done.stderr[-2000:]
    assert sorted(p.name for p in tmp.iterdir()) == []


# multiprocessing makes its folder (mkdtemp), logs that, then notes it: a pause between, as a loaded machine
# can make, where a SIGTERM to a command that made that folder as it started its server left it behind.
SLOW_MULTIPROCESSING_FOLDER = """
import multiprocessing.util, time
_info = multiprocessing.util.info
def info(msg, *args):
    if msg.startswith("created temp directory"):
        time.sleep(0.5)
    _info(msg, *args)
multiprocessing.util.info = info
"""


@pytest.mark.parametrize("pause", [False, True], ids=["as-is", "pause-in-multiprocessing-mkdtemp"])
def test_a_build_ended_by_sigterm_leaves_nothing_in_tmpdir(tmp_path, monkeypatch, pause):
    """SIGTERM (a cancelled CI job, `kill`) runs no exit code: the command line ends the stage server and
    removes its folder and multiprocessing's in its handler, then ends as the signal ends it. Both were
    left in TMPDIR, one pair per such run. Called in a process, the command puts the handler back."""
    from sdbuild.cli import main

    before = signal.getsignal(signal.SIGTERM)
    assert main(["schema"]) == 0 and signal.getsignal(signal.SIGTERM) is before
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # the build's own, as a user's shell has none
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    path = [str(REPO)]
    if pause:
        (tmp_path / "site").mkdir()
        (tmp_path / "site" / "sitecustomize.py").write_text(SLOW_MULTIPROCESSING_FOLDER)
        path.insert(0, str(tmp_path / "site"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdbuild.cli", "run", str(REPO / "recipes" / "tiny.yaml"), "--artifacts", str(tmp_path / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": os.pathsep.join(path)},
    )
    deadline = time.monotonic() + 120
    while not any(p.name.startswith("sdbuild-server-") for p in tmp.iterdir()):  # the server is importing
        assert proc.poll() is None and time.monotonic() < deadline, "no stage server folder"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGTERM and "Traceback" not in err, err[-2000:]
    assert sorted(p.name for p in tmp.iterdir()) == []


def test_a_process_of_ours_gives_torch_a_cache_folder_of_its_own_and_keeps_a_users(tmp_path, monkeypatch):
    """private_torch_cache: a fresh folder in TMPDIR named in the variable, removed after; a folder the user named stays theirs."""
    from sdbuild.torch_cache import ENV, private_torch_cache

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.delenv(ENV, raising=False)
    with private_torch_cache() as folder:
        assert os.environ[ENV] == folder and Path(folder).parent == tmp_path and Path(folder).is_dir()
        (Path(folder) / "dynamo").mkdir()  # what torch makes in it
    assert ENV not in os.environ and list(tmp_path.iterdir()) == []
    users = tmp_path / "mine"
    users.mkdir()
    monkeypatch.setenv(ENV, str(users))
    with private_torch_cache() as folder:
        assert folder is None and os.environ[ENV] == str(users)
    assert os.environ[ENV] == str(users) and users.is_dir()
