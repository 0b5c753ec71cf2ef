"""The remote stage cache, against a real S3-compatible server on loopback (moto)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdbuild.cache import LocalCache, RemoteCache, redact_url

from helpers import run_cli_here, write_recipe

RECIPE = """
name: tiny-te
model: {version: synthetic:tiny-sd}
components: [text_encoder]
resolution: {height: 64, width: 64}
verify: {samples: 1}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's standalone server in a child process, with one bucket."""

    def __init__(self):
        self.port = free_port()
        self.env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": "testing-key",
            "AWS_SECRET_ACCESS_KEY": "testing-secret-do-not-log",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
        }
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                assert time.time() < deadline, "moto server did not start"
                time.sleep(0.1)
        self.s3().create_bucket(Bucket="cache")

    def stop(self):
        if self.proc:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def s3(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], aws_access_key_id="testing-key",
            aws_secret_access_key="testing-secret-do-not-log", region_name="us-east-1",
        )

    def keys(self, prefix="") -> list[str]:
        pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket="cache", Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    server.start()
    yield server
    server.stop()


def run(recipe, art, env, *extra):
    return subprocess.run(
        [sys.executable, "-m", "sdbuild.cli", "run", str(recipe), "--artifacts", str(art), "--cache-url", "s3://cache/sd", *extra],
        capture_output=True, text=True, env=env, timeout=900,
    )


def run_here(recipe, art, s3: S3Server, monkeypatch):
    """``run`` in this process (``run_cli_here``), with the server's environment: the remote cache is
    the build process's own (its stages never reach it), and the stages fork from this process's
    stage server instead of each run starting one. One server per module: the S3 filesystem
    fsspec makes (and keeps) for the first run stays right for every later one."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.setenv(name, s3.env[name])
    return run_cli_here("run", recipe, "--artifacts", art, "--cache-url", "s3://cache/sd")


def cache_column(art: Path, name="tiny-te") -> dict:
    report = json.loads((art / "builds" / name / "build.json").read_text())
    return {(r["stage"], r["component"]): r["cache"] for r in report["stages"]}


def test_redact_url_hides_credentials():
    assert redact_url("s3://AKIA:secret@bucket/p") == "s3://***@bucket/p"
    assert redact_url("file:///x/y") == "file:///x/y"


def test_file_remote_round_trip_and_corruption(tmp_path):
    remote = RemoteCache(f"file://{tmp_path / 'remote'}", warn=lambda line: warnings.append(line))
    warnings: list[str] = []
    a = LocalCache(tmp_path / "a", remote)

    def produce(t):
        (t / "w.bin").write_bytes(b"weights")
        return {}

    _, how = a.build("convert", "k", produce, {})
    assert how == "miss" and remote.uploaded == 1
    _, how = LocalCache(tmp_path / "b", remote).build("convert", "k", lambda t: pytest.fail("must download"), {})
    assert how == "remote"
    # Corrupt the blob: the next reader detects it, discards the entry, rebuilds and re-uploads.
    blob = next(p for p in (tmp_path / "remote" / "blobs").rglob("*") if p.is_file())
    blob.write_bytes(b"tampered")
    entry, how = LocalCache(tmp_path / "c", remote).build("convert", "k", produce, {})
    assert how == "miss" and (entry.path / "w.bin").read_bytes() == b"weights"
    assert any("does not match its sha256" in w for w in warnings)
    _, how = LocalCache(tmp_path / "d", remote).build("convert", "k", lambda t: pytest.fail("must download"), {})
    assert how == "remote"


def test_second_machine_downloads_every_stage_and_builds_none(s3, tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path, "tiny-te", RECIPE)
    first = run(recipe, tmp_path / "a", s3.env)  # a process of its own: its stages too have the credentials in their environment
    assert first.returncode == 0, first.stderr[-2000:]
    assert set(cache_column(tmp_path / "a").values()) == {"miss"}
    second = run_here(recipe, tmp_path / "b", s3, monkeypatch)
    assert second.returncode == 0, second.stderr[-2000:]
    assert set(cache_column(tmp_path / "b").values()) == {"remote"}
    # Credentials never reach logs, manifests or reports.
    for art in (tmp_path / "a", tmp_path / "b"):
        for f in art.rglob("*"):
            if f.is_file() and f.suffix in (".json", ".log", ".md", ".html"):
                assert "testing-secret-do-not-log" not in f.read_text(errors="ignore"), f
    assert "testing-secret-do-not-log" not in first.stdout + first.stderr + second.stdout + second.stderr


def test_corrupted_remote_file_is_rebuilt_and_reuploaded(s3, tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path, "tiny-te", RECIPE.replace("samples: 1", "samples: 1, seed: 5"))
    assert run_here(recipe, tmp_path / "a", s3, monkeypatch).returncode == 0
    verify_key = next(r["key"] for r in json.loads((tmp_path / "a/builds/tiny-te/build.json").read_text())["stages"] if r["stage"] == "verify")
    manifest = json.loads(s3.s3().get_object(Bucket="cache", Key=f"sd/verify/{verify_key}/manifest.json")["Body"].read())
    sha = manifest["files"]["psnr.json"]
    s3.s3().put_object(Bucket="cache", Key=f"sd/blobs/{sha[:2]}/{sha}", Body=b"{}")
    done = run_here(recipe, tmp_path / "b", s3, monkeypatch)
    assert done.returncode == 0, done.stderr[-2000:]
    column = cache_column(tmp_path / "b")
    assert column[("verify", "text_encoder")] == "miss"
    assert column[("convert", "text_encoder")] == "remote"
    assert "psnr.json does not match its sha256" in done.stderr
    again = run_here(recipe, tmp_path / "c", s3, monkeypatch)
    assert set(cache_column(tmp_path / "c").values()) == {"remote"}, again.stderr[-2000:]


def test_concurrent_builds_both_succeed_with_one_entry_per_key(s3, tmp_path):
    recipe = write_recipe(tmp_path, "tiny-te", RECIPE.replace("samples: 1", "samples: 1, seed: 6"))
    cmd = lambda art: [sys.executable, "-m", "sdbuild.cli", "run", str(recipe), "--artifacts", str(art), "--cache-url", "s3://cache/sd"]
    procs = [subprocess.Popen(cmd(tmp_path / n), env=s3.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in "ab"]
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-2000:]
    for art in (tmp_path / "a", tmp_path / "b"):
        report = json.loads((art / "builds/tiny-te/build.json").read_text())
        for row in report["stages"]:
            assert s3.keys(f"sd/{row['stage']}/{row['key']}/") == [f"sd/{row['stage']}/{row['key']}/manifest.json"]


def test_remote_stopped_mid_run_warns_once_and_builds_locally(tmp_path):
    server = S3Server()
    server.start()
    recipe = write_recipe(tmp_path, "tiny-te", RECIPE.replace("samples: 1", "samples: 1, seed: 7"))
    art = tmp_path / "a"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdbuild.cli", "run", str(recipe), "--artifacts", str(art), "--cache-url", "s3://cache/sd"],
        env=server.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.time() + 300
        while not (art / "cache" / "download").is_dir() or not any((art / "cache" / "download").iterdir()):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        server.stop()
        out, err = proc.communicate(timeout=900)
    finally:
        server.stop()
    assert proc.returncode == 0, err[-2000:]
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "continuing with the local cache only" in warnings[0], err[-2000:]
    assert set(cache_column(art).values()) == {"miss"}
    assert (art / "builds" / "tiny-te" / "Resources" / "TextEncoder.mlpackage").is_dir()


def test_required_remote_that_is_down_fails_with_one_line(tmp_path):
    recipe = write_recipe(tmp_path, "tiny-te", RECIPE)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    done = run(recipe, tmp_path / "a", env, "--require-remote-cache")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: remote cache s3://cache/sd download failed") and "--require-remote-cache" in lines[-1]
