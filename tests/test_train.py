"""Training service end to end with real components: local and Ray (2 workers); torchrun: see the note below."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from hierseg.data.synth import ensure_synthetic
from hierseg.spec import validate_spec
from hierseg.train.checkpoint import load_state
from tests.train_utils import (
    TRAIN,
    descendant_pids,
    mlflow_runs,
    ray_env,
    sqlite_store,
    tiny_spec,
    train_cli,
    write_spec,
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    spec = validate_spec(tiny_spec(root, root))
    ensure_synthetic(spec.data)
    return root


def _val_valid_pixels(shards: Path) -> int:
    return sum(json.loads((shards / "val" / "manifest.json").read_text())["class_histogram"])


def _latest_model(run_dir: Path) -> dict:
    index = json.loads((run_dir / "checkpoints.json").read_text())
    return load_state(run_dir / index[-1]["dir"])


def test_local_run_logs_one_mlflow_run_with_metrics_and_model(shards, tmp_path):
    """--launcher local: one MLflow run, val/num_valid = manifest's valid pixels, model registered."""
    spec = tiny_spec(shards, tmp_path, run={"num_workers": 1}, tracking={"registered_model": "tiny"})
    out = train_cli(write_spec(spec, tmp_path / "s.yaml"), "--launcher", "local")
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = mlflow_runs(spec["tracking"]["uri"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["val/num_valid"] == _val_valid_pixels(shards)
    assert "val/fine/miou" in run.data.metrics and "val/coarse/iou/non_tissue" in run.data.metrics
    assert "val/fine/iou/soma" not in run.data.metrics or run.data.metrics["val/fine/iou/soma"] >= 0
    assert run.data.params["loss.lambda_coarse"] == "0.2"
    assert "models:/tiny/1" in out.stdout
    from mlflow.tracking import MlflowClient

    figures = MlflowClient(spec["tracking"]["uri"]).list_artifacts(run.info.run_id, "eval/step_00000008")
    assert {Path(f.path).name for f in figures} == {"confusion.png", "iou.png", "samples.png"}


# torchrun --nproc_per_node 2 (rank 0 owns the single MLflow run, validation seen exactly once) is asserted by
# tests/test_multi_source.py::test_torchrun_two_sources_logs_per_source_metrics, one launch for both (test time);
# the single-source multi-process path also by tests/test_deploy_slurm.py's multi-node job.


def test_run_in_this_process_restores_signal_handlers_and_frees_its_model(shards, tmp_path):
    """After a run in the caller's process its signal handlers are back and no model outlives the run."""
    import gc

    from hierseg.model import UNet
    from hierseg.train.launch import run_in_process

    signals = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
    before = {sig: signal.getsignal(sig) for sig in signals}
    gc.collect()  # models other tests in this process still hold are not this run's
    others = {id(o) for o in gc.get_objects() if type(o) is UNet}  # type(): isinstance warns on lazy torch attrs
    spec = tiny_spec(shards, tmp_path, run={"num_workers": 1, "max_steps": 2, "eval_every": 2},
                     tracking={"log_model": False})  # fmt: skip
    assert run_in_process(validate_spec(spec), "local")["finished"]
    assert {sig: signal.getsignal(sig) for sig in signals} == before
    gc.collect()  # a DDP model alive past its process group aborts a gloo process at exit (close_context)
    assert not [o for o in gc.get_objects() if type(o) is UNet and id(o) not in others]


def test_exact_resume_matches_uninterrupted_run(shards, tmp_path):
    """Stopped at step N of 2N and resumed: same final step and bit-identical weights, dropout included."""
    model = {"dropout": 0.2}  # draws from the global RNG every step: resume must restore it untouched
    full = tiny_spec(shards, tmp_path / "a", run={"num_workers": 1}, tracking={"log_model": False}, model=model)
    part = tiny_spec(shards, tmp_path / "b", run={"num_workers": 1, "stop_at_step": 4}, tracking={"log_model": False},
                     model=model)  # fmt: skip
    # the uninterrupted and the interrupted run are independent: run them side by side (test time)
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(train_cli, write_spec(spec, tmp_path / name), "--launcher", "local")
                for spec, name in ((full, "a.yaml"), (part, "b.yaml"))]  # fmt: skip
        outs = [r.result() for r in runs]
    for out in outs:
        assert out.returncode == 0, out.stderr[-3000:]
    assert "stopped at step 4" in outs[1].stderr
    assert _latest_model(tmp_path / "b" / "runs" / "t")["step"] == 4
    out = train_cli(tmp_path / "b.yaml", "--launcher", "local", "--set", "run.stop_at_step=null")
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = _latest_model(tmp_path / "a" / "runs" / "t"), _latest_model(tmp_path / "b" / "runs" / "t")
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    (run,) = mlflow_runs(part["tracking"]["uri"])  # the resumed job continued the same MLflow run
    assert run.info.status == "FINISHED"


def test_missing_shards_fail_before_workers_start(tmp_path):
    """A spec whose shards do not exist exits 2 naming data.train, without starting Ray."""
    spec = tiny_spec(tmp_path / "nowhere", tmp_path)
    del spec["data"]["synthetic"]
    t0 = time.monotonic()
    out = train_cli(write_spec(spec, tmp_path / "s.yaml"))
    assert out.returncode == 2
    assert "data.train" in out.stderr and "nowhere" in out.stderr
    assert time.monotonic() - t0 < 30


def test_unreachable_tracking_server_fails_fast(shards, tmp_path):
    """An MLflow URI nobody answers at exits 2 with the URI in the message, before any worker."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    spec = tiny_spec(shards, tmp_path, tracking={"uri": uri})
    out = train_cli(write_spec(spec, tmp_path / "s.yaml"))
    assert out.returncode == 2
    assert uri in out.stderr and "unreachable" in out.stderr


def test_bad_spec_exits_2_with_field_path(tmp_path):
    """A bad spec exits 2 and names the field."""
    path = tmp_path / "s.yaml"
    path.write_text("data: {train: a, val: b, batch_size: 4}\nrun: {max_steps: 10}\nloss: {lamda_coarse: 1}\n")
    out = train_cli(path)
    assert out.returncode == 2 and "did you mean lambda_coarse" in out.stderr


@pytest.mark.slow
def test_ray_two_workers_and_sigkill_recovery(shards, tmp_path):
    """Ray Train, 2 CPU workers: a worker killed with SIGKILL mid-run is restarted from the latest
    checkpoint; the run reaches max_steps with a single MLflow run, without Ray Train's per-report
    chatter. (A worker's error as one line: Ray 2.60's exception chain in test_reliability, end to end in
    bench/probe.py, which starts a Ray run per case.)"""
    spec = tiny_spec(
        shards,
        tmp_path,
        run={"max_steps": 12, "eval_every": 12, "checkpoint_every": 3, "log_every": 3, "max_failures": 2},
        tracking={"log_model": False},
    )
    spec_path = write_spec(spec, tmp_path / "s.yaml")
    proc = subprocess.Popen(
        [sys.executable, TRAIN, "--spec", str(spec_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ray_env(),
    )
    lines, killed = [], False
    for line in proc.stdout:
        lines.append(line)
        if not killed and "step 6/12" in line:
            pids = [str(p) for p in descendant_pids("ray::RayTrainWorker", proc.pid)]
            assert pids, "no Ray Train worker process found"
            os.kill(int(pids[-1]), signal.SIGKILL)
            killed = True
    proc.wait(timeout=600)
    log = "".join(lines)
    assert proc.returncode == 0, log[-4000:]
    assert killed
    resumed = [int(n) for n in re.findall(r"resumed from step (\d+)", log)]
    # killed once step 6 was logged: the step-3 checkpoint was complete, so nothing older may be taken
    assert resumed and min(resumed) >= 3, resumed
    (run,) = mlflow_runs(spec["tracking"]["uri"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["val/num_valid"] == _val_valid_pixels(shards)
    assert run.data.tags["hierseg.launcher"] == "ray"
    assert "Reporting training result" not in log and "Checkpoint successfully created" not in log


def test_non_finite_loss_stops_naming_the_step(shards, tmp_path):
    """A NaN in the model makes train_step raise FloatingPointError naming the step."""
    from hierseg.train.context import init_context
    from hierseg.train.loop import build_job, train_step

    spec = validate_spec(tiny_spec(shards, tmp_path, run={"num_workers": 1}))
    job = build_job(spec, init_context(spec, "local"), None)
    images, labels = next(iter(job.stream))
    with torch.no_grad():
        job.model.fine_head.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite loss at step 1"):
        train_step(job, images, labels)


def test_tracked_metrics_reach_mlflow_within_flush_s_while_the_run_goes_on(tmp_path):
    """Few metrics, slow steps: they are in the MLflow store after ``flush_s``, before the run's final wait()."""
    import mlflow

    from hierseg.tracking import MlflowTracker

    uri = sqlite_store(tmp_path)
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("flush")).info.run_id
    tracker = MlflowTracker(uri, run_id, flush_every=10_000, flush_s=0.5)  # count alone would never send
    tracker.log_metrics({"train/loss_fine": 1.0}, step=1)
    time.sleep(0.6)
    tracker.log_metrics({"train/loss_fine": 0.5}, step=2)  # a "slow step" later: this call hands both over
    deadline = time.monotonic() + 20
    while len(client.get_metric_history(run_id, "train/loss_fine")) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    got = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss_fine"))
    assert got == [(1, 1.0), (2, 0.5)]
    assert tracker.wait()


def test_tracking_outage_mid_run_is_buffered_not_fatal(monkeypatch):
    """An unreachable tracking server during a run: flush warns and keeps the metrics for later."""
    from hierseg.tracking import MlflowTracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own back-off would take minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tracker = MlflowTracker(f"http://127.0.0.1:{port}", "0" * 32, retry_s=0.5)
    tracker.log_metrics({"train/loss_fine": 1.0, "train/loss_coarse": 0.5}, step=3)
    t0 = time.monotonic()
    tracker.flush()  # hands the batch to the sender thread and returns at once
    assert time.monotonic() - t0 < 0.5
    with pytest.warns(UserWarning, match="will retry later"):
        tracker.wait()
    assert tracker.num_unsent_metrics == 2  # kept for the next batch, not lost
