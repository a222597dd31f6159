"""deploy/mlflow/server.sh against a real MLflow server on 127.0.0.1: start, log a run with an artifact
through the server, register a model version, point an alias at it, stop (the whole process group).

Why: the shared tracking server is what sweeps and promote rely on; its start/stop script must leave
no stray processes and must bind to loopback by default. The training run and jobs/promote.py replace
the client calls here once they exist.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.train_utils import sqlite_store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]
SERVER = REPO / "deploy" / "mlflow" / "server.sh"


def test_server_script_start_log_alias_stop(tmp_path: Path) -> None:
    mlflow = pytest.importorskip("mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",
        "MLFLOW_STATE_DIR": str(tmp_path / "srv"),
        "MLFLOW_BIN": str(Path(sys.executable).with_name("mlflow")),
        "PYTHON": sys.executable,
        "MLFLOW_WAIT_S": "230",
    }  # fmt: skip  (a loaded machine: seen > 120 s to answer /health)
    sqlite_store(tmp_path / "srv")  # the script's default store, already migrated (test time)
    start = subprocess.run([SERVER, "start"], env=env, capture_output=True, text=True, timeout=240, check=False)
    pid = int((tmp_path / "srv" / "server.pid").read_text())
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        assert f"ready at http://127.0.0.1:{port}" in start.stdout
        client = mlflow.MlflowClient(tracking_uri=f"http://127.0.0.1:{port}", registry_uri=f"http://127.0.0.1:{port}")
        exp = client.create_experiment("deploy-test")
        run = client.create_run(exp, tags={"sweep": "s1"})
        client.log_metric(run.info.run_id, "val/fine/miou", 0.5)
        (tmp_path / "note.txt").write_text("artifact through the server")
        client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
        client.set_terminated(run.info.run_id)
        assert list((tmp_path / "srv" / "artifacts").rglob("note.txt")), "artifact not in --artifacts-destination"
        client.create_registered_model("deploy-test-model")
        version = client.create_model_version("deploy-test-model", f"runs:/{run.info.run_id}/note.txt", run.info.run_id)
        client.set_registered_model_alias("deploy-test-model", "champion", version.version)
        assert client.get_model_version_by_alias("deploy-test-model", "champion").run_id == run.info.run_id
    finally:
        subprocess.run([SERVER, "stop"], env=env, capture_output=True, timeout=60, check=False)
    time.sleep(0.5)
    alive = subprocess.run(["pgrep", "-g", str(pid)], capture_output=True, text=True, check=False).stdout.split()
    assert not alive, f"processes of the server's group still running: {alive}"
