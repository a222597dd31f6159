"""`ray start --head` on 127.0.0.1 + deploy/ray/submit.sh (`ray job submit -- python jobs/train.py`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from hierseg.data.synth import ensure_synthetic
from hierseg.spec import validate_spec
from tests.train_utils import ROOT, mlflow_runs, tiny_spec

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    env = dict(os.environ, RAY_TMPDIR=tempfile.mkdtemp(prefix="ray", dir="/tmp"), RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    # test time: the job's driver and Ray Train's controller inherit these from the cluster (tests.train_utils.ray_env)
    env.update(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5", RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    dash = _free_port()
    start = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={_free_port()}", "--num-cpus=2"]
    start += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={env['RAY_TMPDIR']}"]
    # every port free, not Ray's fixed defaults: another Ray cluster on the machine (a benchmark) keeps its own
    for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                 "runtime-env-agent-port", "ray-client-server-port"):  # fmt: skip
        start.append(f"--{flag}={_free_port()}")
    out = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    try:
        yield env, f"http://127.0.0.1:{dash}"
    finally:
        _stop_cluster_of(env["RAY_TMPDIR"])


def _stop_cluster_of(temp_dir: str) -> None:
    """Stop the processes of this test's cluster only (they name its temp folder): ``ray stop`` would also
    kill every other Ray cluster of the user on the machine, e.g. a benchmark running beside the tests."""
    import signal
    import time

    def pids() -> list[int]:
        out = subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True).stdout.split()
        return [int(p) for p in out if int(p) != os.getpid()]

    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 20)):  # a test cluster has nothing to save
        for pid in pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while pids() and time.monotonic() < deadline:
            time.sleep(0.5)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_trains_on_the_cluster(ray_head, tmp_path):
    """The documented submit script runs the training job on a running cluster; one MLflow run logged."""
    env, address = ray_head
    spec = tiny_spec(tmp_path / "shards", tmp_path)
    ensure_synthetic(validate_spec(spec).data)
    sets = [
        f"data.train={spec['data']['train']}",
        f"data.val={spec['data']['val']}",
        "data.synthetic=null",
        "data.batch_size=4",
        "data.num_workers=0",
        "model.base_channels=8",
        "model.depth=2",
        "run.max_steps=2",
        "run.eval_every=2",
        f"run.storage_path={tmp_path / 'runs'}",
        f"tracking.uri={spec['tracking']['uri']}",
        "tracking.experiment=tests",
        "tracking.registered_model=null",
        "tracking.log_model=false",
    ]
    args = [str(ROOT / "deploy" / "ray" / "submit.sh"), "examples/specs/quickstart.yaml"]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(
        args, env=dict(env, RAY_ADDRESS=address), capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "succeeded" in out.stdout + out.stderr
    (run,) = mlflow_runs(spec["tracking"]["uri"])
    assert run.info.status == "FINISHED" and run.data.tags["hierseg.launcher"] == "ray"
    assert "val/fine/miou" in run.data.metrics
