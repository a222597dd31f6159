"""Real Slurm on this machine: deploy/slurm/local_cluster.sh starts a one-node cluster (installing Debian's
slurmctld/slurmd/munge when missing), then real jobs go through it: a 3-task array job, a 3-trial sweep
submitted by ``hierseg sweep --slurm --submit``, ``srun -n2`` with a gloo all-reduce, and
deploy/slurm/multinode.sbatch (srun + torchrun c10d rendezvous), including the SIGUSR1 -> checkpoint ->
requeue -> resume path.

Why real: sbatch directives, array indices, environment propagation and signal forwarding are exactly the
things a mocked Slurm would get right and a real one might not. Training is replaced by a stand-in
(tests/_deploy_stub_train.py) until jobs/train.py exists; the plumbing around it is the subject here.
Opt-in marker ``slurm`` (CI runs it as root on a fresh machine).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "deploy" / "slurm" / "local_cluster.sh"
STUB = Path(__file__).with_name("_deploy_stub_train.py")
BASE = """
data: {train: d/train, val: d/val, batch_size: 4, num_workers: 0}
run: {name: tiny, num_workers: 2, max_steps: 3}
tracking: {uri: sqlite:///mlflow.db, experiment: slurm-test}
"""


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


def test_sweep_submits_an_array_and_skips_finished_trials(slurm: None, tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(BASE)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "sl", "grid": {"loss.lambda_coarse": [0, 0.1, 0.5]}}))
    env = {**os.environ, "HIERSEG_TRAIN_SCRIPT": str(STUB), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "hierseg.cli", "sweep", "--spec", "base.yaml", "--sweep", "s.yaml", "--out", "o",
           "--slurm", "--submit", "--throttle", "2", "--cpus-per-task", "1"]  # fmt: skip
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert first.returncode == 0, first.stderr
    index = json.loads((tmp_path / "o" / "sweep.json").read_text())
    job = index["submissions"][0]["job_id"]
    assert index["submissions"][0]["trials"] == "0-2"
    wait_for_job(job)
    for n, lam in enumerate([0, 0.1, 0.5]):
        trial = tmp_path / "o" / f"trial_{n:03d}"
        assert (trial / "DONE").exists(), logs(tmp_path / "o")
        record = json.loads((trial / "stub_ran.json").read_text())
        assert record["tags"] == {"sweep": "sl", "trial": str(n)} and record["lambda_coarse"] == lam
        assert record["run_name"] == f"tiny-sl-t{n:03d}"
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0 and "every trial has finished" in again.stdout
    assert len(json.loads((tmp_path / "o" / "sweep.json").read_text())["submissions"]) == 1


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


def _multinode(tmp_path: Path, **extra_env: str) -> tuple[str, Path]:
    """Submit deploy/slurm/multinode.sbatch on the one node with 2 torchrun processes and the stand-in."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**yaml.safe_load(BASE), "tracking": {"tags": {"sweep": "mn"}}}))
    spec.write_text(spec.read_text().replace("tracking:", "loss: {lambda_coarse: 0.2}\ntracking:"))
    env = {**os.environ, "HIERSEG_TRAIN_SCRIPT": str(STUB), "HIERSEG_PYTHON": sys.executable,
           "HIERSEG_NPROC_PER_NODE": "2", "HIERSEG_RDZV_PORT": str(free_port()), "HIERSEG_REPO": str(REPO),
           "HIERSEG_STUB_OUT": str(tmp_path), **extra_env}  # fmt: skip
    script = REPO / "deploy" / "slurm" / "multinode.sbatch"
    job = sh("sbatch", "--parsable", "--nodes=1", f"--output={tmp_path}/mn-%j.out", script, spec, env=env).strip()
    return job, tmp_path


def test_multinode_script_rendezvous_with_torchrun(slurm: None, tmp_path: Path) -> None:
    job, out = _multinode(tmp_path)
    wait_for_job(job)
    record = json.loads((out / "stub_ran.json").read_text()) if (out / "stub_ran.json").exists() else logs(out)
    assert isinstance(record, dict), record
    assert (record["launcher"], record["world"], record["sum"]) == ("torchrun", 2, 3)


def test_multinode_usr1_checkpoints_requeues_and_resumes(slurm: None, tmp_path: Path) -> None:
    job, out = _multinode(tmp_path, HIERSEG_STUB_WAIT_SIGNAL="1")
    deadline = time.monotonic() + 120
    while not all((out / f"waiting.{r}").exists() for r in (0, 1)):
        assert time.monotonic() < deadline, logs(out)
        time.sleep(0.5)
    sh("scancel", "--batch", "--signal=USR1", job)  # what --signal=B:USR1@120 does before the time limit
    deadline = time.monotonic() + 240
    while not (out / "stub_ran.json").exists():
        assert time.monotonic() < deadline, logs(out)
        time.sleep(1)
    wait_for_job(job)
    assert (out / "checkpoint").read_text().strip() == "SIGUSR1"
    record = json.loads((out / "stub_ran.json").read_text())
    assert record["resumed"] is True and record["world"] == 2
