"""NUTS chains give the same draws whichever executor runs them (one process per chain, Ray tasks)
and whether progress bars are shown. A very short run of the tiny config: a few seconds a chain."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from train import config, data, map as map_stage, posterior

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def spec():
    cfg = config.load(ROOT / "train/configs/tiny.toml")
    cfg["posterior"].update(chains=2, warmup=20, draws=10, max_doublings=4)
    cfg["map"]["steps"] = 100
    d = data.load(cfg)
    return posterior.chain_spec(cfg, d, map_stage.run(cfg, d))


@pytest.fixture(scope="module")
def local(spec):
    draws, infos = posterior.run_chains(spec, 2, "local")
    return draws


def test_one_process_per_chain_gives_the_local_draws(spec, local):
    draws, infos = posterior.run_chains(spec, 2, "processes", workers=2)
    assert len(draws) == 2 and [i["divergences"] >= 0 for i in infos] == [True, True]
    for a, b in zip(local, draws):
        assert a.shape == (10, spec["starts"].shape[1]) and np.array_equal(a, b)  # bitwise


def test_progress_bars_do_not_change_the_draws(spec, local, monkeypatch, capfd):
    monkeypatch.setenv("POSTFLOW_PROGRESS", "1")
    pos, _ = posterior.run_chain(spec, 1)
    assert np.array_equal(pos, local[1])
    err = capfd.readouterr().err
    assert "chain 1 warm-up" in err and "chain 1 sampling" in err and "/20 [" in err and "/10 [" in err


def test_bars_are_quiet_without_a_terminal(monkeypatch, capfd):
    from train import progress
    monkeypatch.delenv("POSTFLOW_PROGRESS", raising=False)
    assert not progress.enabled()  # pytest captures stderr: not a terminal
    with progress.bar(5, "x") as bar:
        bar.update(5)
    assert capfd.readouterr().err == ""
    monkeypatch.setenv("POSTFLOW_PROGRESS", "0")
    assert not progress.enabled()


def test_unknown_executor_is_refused(spec):
    with pytest.raises(ValueError, match="unknown posterior.executor 'threads'"):
        posterior.run_chains(spec, 2, "threads")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_tasks_give_the_local_draws(spec, local, tmp_path):
    """A local Ray head on 127.0.0.1 with two worker CPUs; chains as Ray tasks. Ray is an optional
    extra (train/requirements-ray.txt): skipped where it is not installed."""
    ray = pytest.importorskip("ray")
    ray_bin = Path(sys.executable).parent / "ray"
    ray_bin = str(ray_bin) if ray_bin.exists() else shutil.which("ray")
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                             "--disable-usage-stats", f"--temp-dir={temp}"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or head.poll() is not None:
                    pytest.fail("the Ray head did not start: " + (tmp_path / "head.log").read_text()[-2000:])
                time.sleep(0.5)
        draws, _ = posterior.run_chains(spec, 2, "ray", ray_address=address)
        for a, b in zip(local, draws):
            assert np.array_equal(a, b)
    finally:
        head.terminate()
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_chain_benchmark_times_every_variant_with_equal_draws():
    """train.diagnostics.bench_chains with --single-thread-workers: sequential chains, one process
    per chain, and processes with one XLA thread each all run, and their draws are bitwise equal."""
    from train.diagnostics import bench_chains
    res = bench_chains.main([str(ROOT / "train/configs/tiny.toml"), "--chains", "2", "--warmup", "5", "--draws", "3",
                             "--single-thread-workers"])
    assert [len(res[k]) for k in ("local", "processes", "processes_1thread")] == [1, 1, 1]
    assert res["identical"] and len(res["speedup_1thread"]) == 1
    assert os.environ.get("XLA_FLAGS") != bench_chains.ONE_THREAD  # this process's environment is restored
