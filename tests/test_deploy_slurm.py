"""Real Slurm on this machine: deploy/slurm/local_cluster.sh starts a one-node cluster (installing Debian's
slurmctld/slurmd/munge when missing), then real jobs go through it: a 3-task array job, ``srun -n2`` with a
gloo all-reduce, a 3-trial sweep of real tiny training runs submitted by ``hierseg sweep --slurm --submit``
and ranked by ``hierseg promote``, and real ``jobs/train.py --launcher torchrun`` through
deploy/slurm/multinode.sbatch (srun + torchrun c10d rendezvous, 2 processes) including the SIGUSR1 ->
checkpoint -> requeue -> resume path.

Why real: sbatch directives, array indices, environment propagation, signal forwarding, concurrent
trials logging to one MLflow server and resuming a requeued job are exactly the things a mocked Slurm
or a stand-in training script would get right and the real ones might not. The trials log to a real
``mlflow server`` (deploy/mlflow/server.sh on 127.0.0.1): with ``--throttle 2`` two trials write at once,
which a SQLite file store does not reliably tolerate ("database is locked"). The server starts in the
background when the module begins, so the sweep test comes last. The multi-node job has one writer (rank 0)
and logs to a SQLite file.
Opt-in marker ``slurm`` (CI runs it as root on a fresh machine).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.train_utils import sqlite_store, tiny_spec, write_spec

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "deploy" / "slurm" / "local_cluster.sh"
SERVER = REPO / "deploy" / "mlflow" / "server.sh"
METRIC = "val/fine/miou"


def job_env(**extra: str) -> dict[str, str]:
    """Environment of sbatch, which exports it to the job: SLURM_CONF (set by the fixture), the checkout
    importable, one torch thread per process (each array task has one CPU; torchrun sets the same), no
    download progress bars in the logs."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    env.update(extra)
    env.pop("HIERSEG_TRAIN_SCRIPT", None)  # the real jobs/train.py
    return env


@pytest.fixture(scope="session")
def slurm() -> Iterator[None]:
    """Start the one-node cluster once per session (installing it if needed) and stop it at the end."""
    if os.geteuid() != 0:
        pytest.skip("the Slurm tests need root: local_cluster.sh installs packages and runs slurmd as root")
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and apt-get is unavailable to install it")
    state = os.environ.setdefault("HIERSEG_SLURM_DIR", "/tmp/hierseg-slurm")
    res = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=600, check=False)
    if res.returncode and "apt-get" in res.stderr:
        pytest.skip(f"could not install Slurm with apt: {res.stderr.strip()}")
    assert res.returncode == 0, f"local_cluster.sh start failed:\n{res.stdout}\n{res.stderr}"
    os.environ["SLURM_CONF"] = f"{state}/slurm.conf"
    yield
    subprocess.run([str(CLUSTER), "stop"], capture_output=True, timeout=120, check=False)


@pytest.fixture(scope="module", autouse=True)
def _mlflow_boot(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Start deploy/mlflow/server.sh in the background when the module begins (it takes a minute on a loaded
    machine), so the tests that come first overlap with it; stop it (its whole process group) at the end."""
    if not any("mlflow_server" in getattr(item, "fixturenames", ()) for item in request.session.items):
        yield None
        return
    state = tmp_path_factory.mktemp("mlflow-server")
    sqlite_store(state)  # the script's default store, already migrated (test time)
    port = free_port()
    env = {**os.environ, "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1", "MLFLOW_STATE_DIR": str(state),
           "MLFLOW_BIN": str(Path(sys.executable).with_name("mlflow")), "PYTHON": sys.executable}  # fmt: skip
    proc = subprocess.Popen([SERVER, "start"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run([SERVER, "stop"], env=env, capture_output=True, timeout=60, check=False)


@pytest.fixture
def mlflow_server(_mlflow_boot: Any) -> str:
    """URL of the module's real MLflow server on 127.0.0.1, once it answers /health."""
    pytest.importorskip("mlflow")
    proc, url = _mlflow_boot
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"deploy/mlflow/server.sh start failed:\n{out}"
    return url


def sh(*cmd: str | Path, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout, check=False)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res.stdout


def wait_for_job(job_id: str, timeout: float = 180) -> None:
    """Poll squeue until no task of the job is pending or running (no accounting here, so no sacct)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True, check=False)
        if res.returncode or not res.stdout.strip():
            return
        time.sleep(1)
    subprocess.run(["scancel", job_id], check=False)
    pytest.fail(f"Slurm job {job_id} still queued/running after {timeout}s: {res.stdout}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def logs(folder: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()}" for p in sorted(folder.rglob("*.out")))


def test_cluster_is_idempotent(slurm: None) -> None:
    sh(CLUSTER, "start", timeout=300)  # a second start keeps the running daemons
    assert "idle" in sh("sinfo", "-h", "-o", "%t") or "mix" in sh("sinfo", "-h", "-o", "%t")
    sh(CLUSTER, "status")


def test_array_job_runs_one_task_per_index(slurm: None, tmp_path: Path) -> None:
    code = (
        "import os, pathlib; t = os.environ['SLURM_ARRAY_TASK_ID']; "
        f"pathlib.Path('{tmp_path}', 'task_' + t).write_text(os.environ['SLURM_ARRAY_JOB_ID'])"
    )
    wrap = f'{sys.executable} -c "{code}"'
    job = sh("sbatch", "--parsable", "--array=0-2", f"--output={tmp_path}/%A_%a.out", "--wrap", wrap).strip()
    wait_for_job(job)
    written = {p.name: p.read_text() for p in tmp_path.glob("task_*")}
    assert written == {f"task_{i}": job for i in range(3)}, logs(tmp_path)


ALLREDUCE = """
import os, torch, torch.distributed as dist
rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['PORT']}", rank=rank, world_size=world)
t = torch.tensor([rank + 1.0])
dist.all_reduce(t)
print(f"rank {rank}/{world} sum {t.item():.0f}", flush=True)
dist.destroy_process_group()
"""


def test_srun_two_tasks_gloo_all_reduce(slurm: None, tmp_path: Path) -> None:
    script = tmp_path / "allreduce.py"
    script.write_text(ALLREDUCE)
    env = {**os.environ, "PORT": str(free_port())}
    out = sh("srun", "-n2", "--kill-on-bad-exit=1", sys.executable, script, env=env, timeout=180)
    assert sorted(out.split("\n"))[-2:] == ["rank 0/2 sum 3", "rank 1/2 sum 3"], out


def _wait_for_text(path: Path, text: str, timeout: float, folder: Path) -> None:
    deadline = time.monotonic() + timeout
    while not (path.is_file() and text in path.read_text()):
        assert time.monotonic() < deadline, f"{text!r} not in {path} after {timeout}s:\n{logs(folder)}"
        time.sleep(0.2)


def test_multinode_torchrun_trains_stops_on_usr1_requeues_and_resumes(slurm: None, tmp_path: Path) -> None:
    """deploy/slurm/multinode.sbatch on the one node: srun + torchrun (c10d) with 2 gloo processes running
    the real jobs/train.py. SIGUSR1 to the batch shell (what --signal=B:USR1@120 does before the time limit)
    must reach both ranks, which checkpoint at the next log boundary and exit; the script requeues the job,
    the requeued job resumes from that checkpoint into the same MLflow run and finishes it."""
    from mlflow.tracking import MlflowClient

    from hierseg.data.synth import ensure_synthetic
    from hierseg.spec import load_spec

    max_steps = 60  # about 10 s of training: the signal sent after step 2 always lands before the end
    spec = tiny_spec(tmp_path / "shards", tmp_path,
                     run={"name": "mn", "num_workers": 2, "max_steps": max_steps, "eval_every": max_steps,
                          "log_every": 2},
                     tracking={"experiment": "slurm-multinode", "log_model": False})  # fmt: skip
    spec_file = write_spec(spec, tmp_path / "spec.yaml")
    ensure_synthetic(load_spec(str(spec_file)).data)
    env = job_env(HIERSEG_PYTHON=sys.executable, HIERSEG_NPROC_PER_NODE="2", HIERSEG_RDZV_PORT=str(free_port()),
                  HIERSEG_REPO=str(REPO))  # fmt: skip
    script = REPO / "deploy" / "slurm" / "multinode.sbatch"
    out = tmp_path / "mn.out"  # append: the requeued run adds to the first run's log
    job = sh("sbatch", "--parsable", "--nodes=1", "--open-mode=append", f"--output={out}", script, spec_file,
             env=env).strip()  # fmt: skip
    _wait_for_text(out, f"step 2/{max_steps}", 300, tmp_path)  # both ranks are in the loop, handlers installed
    sh("scancel", "--batch", "--signal=USR1", job)
    _wait_for_text(out, "restart 1", 180, tmp_path)
    wait_for_job(job, timeout=400)

    text = out.read_text()
    stopped = sorted({int(m) for m in re.findall(r"stopped at step (\d+)", text)})
    resumed = sorted({int(m) for m in re.findall(r"resumed from step (\d+)", text)})
    assert len(stopped) == 1 and 2 <= stopped[0] < max_steps and resumed == stopped, text
    assert "requeueing job" in text, text
    client = MlflowClient(tracking_uri=spec["tracking"]["uri"])  # SQLite: rank 0 is the only writer
    exp = client.get_experiment_by_name("slurm-multinode")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [(r.info.run_name, r.info.status) for r in runs]  # the resumed job reused its run
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["hierseg.launcher"] == "torchrun", text
    hist = json.loads((tmp_path / "shards" / "val" / "manifest.json").read_text())["class_histogram"]
    assert run.data.metrics["val/num_valid"] == sum(hist)  # 2 ranks evaluated every val pixel exactly once
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss_fine"))
    assert steps == list(range(2, max_steps + 1, 2)), steps  # resumed where it stopped: no step logged twice


def test_sweep_trains_two_real_trials_and_promote_picks_the_best(
    slurm: None, mlflow_server: str, tmp_path: Path
) -> None:
    """2 array tasks (side by side) each run jobs/train.py --launcher local into one MLflow server."""
    from mlflow.tracking import MlflowClient

    from hierseg.data.synth import ensure_synthetic
    from hierseg.spec import load_spec

    lambdas = [0, 0.5]
    base = tiny_spec(tmp_path / "shards", tmp_path,
                     run={"name": "tiny", "num_workers": 1, "max_steps": 4, "eval_every": 4, "log_every": 2},
                     tracking={"uri": mlflow_server, "experiment": "slurm-sweep", "log_model": True})  # fmt: skip
    write_spec(base, tmp_path / "base.yaml")
    # The shards exist before the array starts, so no two trials race to build them.
    ensure_synthetic(load_spec(str(tmp_path / "base.yaml")).data)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "sl", "grid": {"loss.lambda_coarse": lambdas}}))
    cmd = [sys.executable, "-m", "hierseg.cli", "sweep", "--spec", "base.yaml", "--sweep", "s.yaml", "--out", "o",
           "--slurm", "--submit", "--throttle", "2", "--cpus-per-task", "1"]  # fmt: skip
    first = subprocess.run(cmd, cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=120, check=False)
    assert first.returncode == 0, first.stdout + first.stderr
    index = json.loads((tmp_path / "o" / "sweep.json").read_text())
    job = index["submissions"][0]["job_id"]
    assert index["submissions"][0]["trials"] == "0-1"
    script = (tmp_path / "o" / "array.sbatch").read_text()
    assert "#SBATCH --array=0-1%2" in script and str(REPO / "jobs" / "train.py") in script
    wait_for_job(job, timeout=600)
    for n in range(2):
        assert (tmp_path / "o" / f"trial_{n:03d}" / "DONE").exists(), logs(tmp_path / "o")

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("slurm-sweep")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.sweep = 'sl'")
    by_trial = {r.data.tags["trial"]: r for r in runs}
    assert sorted(by_trial) == ["0", "1"] and len(runs) == 2, [r.info.run_name for r in runs]
    for n, lam in enumerate(lambdas):
        run = by_trial[str(n)]
        assert run.info.status == "FINISHED", logs(tmp_path / "o")
        assert run.info.run_name == f"tiny-sl-t{n:03d}" and run.data.tags["hierseg.launcher"] == "local"
        assert float(run.data.params["loss.lambda_coarse"]) == lam
    # The expected winner, from the runs themselves: best val/fine/miou ever logged, ties to the newest run.
    best = {r.info.run_id: max(m.value for m in client.get_metric_history(r.info.run_id, METRIC)) for r in runs}
    expected = min(runs, key=lambda r: (-best[r.info.run_id], -r.info.start_time))

    name = "hierseg-slurm-sweep"
    promote = [sys.executable, "-m", "hierseg.cli", "promote", "--tracking-uri", mlflow_server,
               "--experiment", "slurm-sweep", "--sweep", "sl", "--name", name]  # fmt: skip
    res = subprocess.run(promote, cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=180, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.run_id == expected.info.run_id, f"{res.stdout}\nexpected {expected.info.run_name}: {best}"
    assert f"{best[expected.info.run_id]:.4f}" in res.stdout

    again = subprocess.run(cmd, cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0 and "every trial has finished" in again.stdout, again.stdout + again.stderr
    assert len(json.loads((tmp_path / "o" / "sweep.json").read_text())["submissions"]) == 1
