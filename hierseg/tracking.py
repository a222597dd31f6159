"""MLflow tracking: one run per job, owned by one process; a no-op tracker everywhere else.

The driver (Ray) or rank 0 (torchrun/local) creates the run; rank 0 logs into it through
:class:`MlflowTracker`, which batches metrics and retries transient outages instead of killing a
long run. Every other rank gets :class:`NullTracker`, so the loop never tests ``rank == 0``.
"""

from __future__ import annotations

import logging
import queue
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hierseg import __version__
from hierseg.spec import JobSpec

log = logging.getLogger(__name__)
_PARAM_MAX = 6000  # MLflow's limit on a param value


class NullTracker:
    """Tracker of every rank that does not own the MLflow run."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def flush(self) -> None: ...

    def wait(self) -> None: ...

    def log_eval_figures(self, metrics: Any, sample: Any, hierarchy: Any, step: int) -> None: ...

    def log_model(self, checkpoint: Path, spec: JobSpec) -> str | None:
        return None


class MlflowTracker:
    """Logs into an existing MLflow run from a background thread, so an outage never stalls training.

    Metrics are buffered and sent with ``log_batch``; figures are rendered here and uploaded by the
    sender. A failed send is retried with back-off for ``retry_s``, then kept and sent with the next
    batch. ``wait()`` blocks until everything queued so far was sent or given up on.
    """

    def __init__(self, uri: str, run_id: str, flush_every: int = 200, retry_s: float = 120.0):
        from mlflow.tracking import MlflowClient

        self.uri, self.run_id = uri, run_id
        self.client = MlflowClient(tracking_uri=uri)
        self.flush_every, self.retry_s = flush_every, retry_s
        self._pending: list[Any] = []  # logged, not yet queued (training thread)
        self._unsent: list[Any] = []  # queued but failed; resent first (sender thread)
        self._jobs: queue.Queue[Callable[[], None]] = queue.Queue()
        threading.Thread(target=self._send_loop, name="hierseg-mlflow", daemon=True).start()

    @property
    def num_unsent_metrics(self) -> int:
        return len(self._pending) + len(self._unsent)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items() if v == v]  # drop NaN
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Hand the buffered metrics to the sender; returns at once."""
        if self._pending:
            batch, self._pending = self._pending, []
            self._jobs.put(lambda: self._send_metrics(batch))

    def wait(self) -> None:
        """Block until everything logged so far was sent (or given up on after ``retry_s``)."""
        self.flush()
        self._jobs.join()

    def log_eval_figures(self, metrics: Any, sample: Any, hierarchy: Any, step: int) -> None:
        """Confusion heat map, IoU bars and validation patches side by side, under ``eval/step_N/``."""
        import matplotlib.pyplot as plt

        from hierseg.train import plots

        figures = {"confusion.png": plots.confusion_figure(metrics), "iou.png": plots.iou_figure(metrics, hierarchy)}
        if sample is not None:
            figures["samples.png"] = plots.samples_figure(sample, hierarchy)
        folder = Path(tempfile.mkdtemp(prefix="hierseg-eval-"))
        for name, fig in figures.items():  # rendered here: pyplot is not thread-safe
            fig.savefig(folder / name, dpi=100)
            plt.close(fig)
        self._jobs.put(lambda: self._upload_folder(folder, f"eval/step_{step:08d}"))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._jobs.put(
            lambda: self._retry(
                lambda: self.client.log_artifact(self.run_id, str(local_path), artifact_path), "log artifact"
            )
        )

    def log_model(self, checkpoint: Path, spec: JobSpec) -> str | None:
        """Log the checkpoint as an MLflow pyfunc model; register it when the spec asks."""
        from hierseg.pyfunc import log_checkpoint_model

        self.wait()
        return log_checkpoint_model(self.uri, self.run_id, checkpoint, spec)

    # ------------------------------------------------------------------------------ sender thread
    def _send_loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job()
            except Exception as e:  # a bug in one upload must not stop the sender
                log.warning("MLflow at %s: %s", self.uri, e)
            finally:
                self._jobs.task_done()

    def _send_metrics(self, batch: list[Any]) -> None:
        metrics, self._unsent = self._unsent + batch, []
        while metrics:
            chunk = metrics[:1000]  # MLflow's per-request metric limit
            if not self._retry(lambda c=chunk: self.client.log_batch(self.run_id, metrics=c), "log metrics"):
                self._unsent = metrics
                return
            del metrics[: len(chunk)]

    def _upload_folder(self, folder: Path, artifact_path: str) -> None:
        try:
            self._retry(lambda: self.client.log_artifacts(self.run_id, str(folder), artifact_path), "log figures")
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _retry(self, call: Callable[[], Any], what: str) -> bool:
        delay, deadline = 1.0, time.monotonic() + self.retry_s
        while True:
            try:
                call()
                return True
            except Exception as e:  # network errors come in many types; never kill training for them
                if time.monotonic() > deadline:
                    warnings.warn(f"MLflow at {self.uri}: could not {what} ({e}); will retry later", stacklevel=2)
                    return False
                log.warning("MLflow at %s: %s failed (%s); retrying in %.0fs", self.uri, what, e, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)


# ------------------------------------------------------------------------------------- driver side
def check_tracking_uri(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, before any worker starts, when the tracking store cannot be reached."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
                if r.status != 200:
                    raise OSError(f"HTTP {r.status}")
        except (OSError, urllib.error.URLError) as e:
            raise ConnectionError(
                f"MLflow tracking server {uri} is unreachable ({e}); start it (deploy/mlflow/server.sh) "
                "or set tracking.uri to a reachable server or a sqlite:/// file"
            ) from None
    elif uri.startswith("sqlite:///"):
        parent = Path(uri.removeprefix("sqlite:///")).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConnectionError(f"MLflow tracking store {uri}: cannot create {parent} ({e})") from None


def artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside the database (not in ./mlruns of whatever folder we run in)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None  # a server decides (--artifacts-destination)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_run(spec: JobSpec, launcher: str) -> str:
    """Create (or reuse, on resume) the job's one MLflow run; log params, tags and the spec."""
    from mlflow.tracking import MlflowClient

    uri = spec.tracking.uri
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(spec.tracking.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(spec.tracking.experiment, artifact_location(uri))
    tags = {
        "hierseg.version": __version__,
        "hierseg.git_commit": git_commit(),
        "hierseg.launcher": launcher,
        **spec.tracking.tags,
    }
    run = client.create_run(exp_id, run_name=spec.tracking.run_name or spec.run.name, tags=tags)
    from mlflow.entities import Param

    params = [Param(k, str(v)[:_PARAM_MAX]) for k, v in spec.flat().items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    client.log_text(run.info.run_id, spec.to_yaml(), "spec.yaml")
    return run.info.run_id


def end_run(uri: str, run_id: str, status: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=uri).set_terminated(run_id, status=status)


def run_is_open(uri: str, run_id: str) -> bool:
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(tracking_uri=uri).get_run(run_id).info.status in {
            "RUNNING",
            "SCHEDULED",
            "FAILED",
            "KILLED",
        }
    except Exception:
        return False
