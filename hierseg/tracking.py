"""MLflow tracking: one run per job, owned by one process; a no-op tracker everywhere else.

The driver (Ray) or rank 0 (torchrun/local) creates the run; rank 0 logs into it through
:class:`MlflowTracker`, which batches metrics and retries transient outages instead of killing a
long run. Every other rank gets :class:`NullTracker`, so the loop never tests ``rank == 0``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import queue
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hierseg import __version__
from hierseg.fsutil import probe_writable
from hierseg.labels import closest
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

    Metrics are buffered and sent with ``log_batch`` every ``flush_every`` metrics or ``flush_s``
    seconds, whichever comes first (by count alone, a slow run, e.g. 3D at a few steps a minute,
    showed no curve in MLflow until it ended); figures are rendered here and uploaded by the sender.
    A failed send is retried with back-off for ``retry_s``, then kept and sent with the next batch.
    ``wait()`` (the end of a run) is bounded by :func:`final_timeout_s` and by SIGTERM/SIGINT: what
    is still unsent then goes to the offline record (:func:`set_offline_record`), replayable with
    ``hierseg replay-tracking``; without a record it stays in memory for a later attempt.
    """

    def __init__(
        self,
        uri: str,
        run_id: str,
        flush_every: int = 200,
        retry_s: float = 120.0,
        record: Path | None = None,
        flush_s: float = 30.0,
    ):
        from mlflow.tracking import MlflowClient

        self.uri, self.run_id = uri, run_id
        self.client = MlflowClient(tracking_uri=uri)
        self.flush_every, self.flush_s, self.retry_s = flush_every, flush_s, retry_s
        self._last_flush = time.monotonic()
        self._record = record
        self._keys = itertools.count()
        self.offline = False
        """True once something was written to the offline record: later sends go there directly."""
        self._lock = threading.Lock()
        self._pending: list[Any] = []  # logged, not yet handed to the sender (training thread)
        self._outbox: list[Any] = []  # handed to the sender, not yet confirmed sent
        self._uploads: dict[int, tuple[Path, str | None, bool]] = {}  # id -> (local, artifact path, temporary)
        self._recorded = 0
        self._give_up = threading.Event()
        self._jobs: queue.Queue[Callable[[], None]] = queue.Queue()
        threading.Thread(target=self._send_loop, name="hierseg-mlflow", daemon=True).start()

    @property
    def record(self) -> Path | None:
        """The offline record: the one given, else the process's (set once the run folder is known)."""
        return self._record if self._record is not None else offline_record()

    @property
    def num_unsent_metrics(self) -> int:
        """Metrics MLflow has not confirmed: buffered, queued, or kept in the offline record."""
        return len(self._pending) + len(self._outbox) + self._recorded

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items() if v == v]  # drop NaN
        if len(self._pending) >= self.flush_every or time.monotonic() - self._last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        """Hand the buffered metrics to the sender; returns at once."""
        self._last_flush = time.monotonic()
        if self._pending:
            with self._lock:
                self._outbox += self._pending
                self._pending = []
            self._jobs.put(self._send_metrics)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until everything logged so far was sent, at most ``timeout_s`` (default
        :func:`final_timeout_s`) or until SIGTERM/SIGINT; returns False when something was left unsent."""
        self.flush()
        deadline = time.monotonic() + (final_timeout_s() if timeout_s is None else timeout_s)
        with _interrupt_sets(self._give_up):
            while self._jobs.unfinished_tasks and time.monotonic() < deadline and not self._give_up.is_set():
                time.sleep(0.05)
        with self._lock:
            unsent = bool(self._outbox or self._uploads)
        if unsent and self.record is not None:
            self._to_record()
        return not unsent

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
        self._queue_upload(folder, f"eval/step_{step:08d}", temporary=True)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._queue_upload(Path(local_path), artifact_path, temporary=False)

    def log_model(self, checkpoint: Path, spec: JobSpec) -> str | None:
        """Log the checkpoint as an MLflow pyfunc model (bounded); registered when the spec asks.

        When MLflow does not answer in time the model goes to the offline record instead.
        """
        from hierseg.serve.pyfunc import log_checkpoint_model

        if self.wait() and not self.offline:
            ok, result = bounded(
                lambda: log_checkpoint_model(self.uri, self.run_id, checkpoint, spec), final_timeout_s()
            )
            if ok:
                return result
            warnings.warn(f"MLflow at {self.uri}: could not log the model ({result})", stacklevel=2)
        if self.record is not None:
            checkpoint = Path(checkpoint).resolve()
            append_record(
                self.record, self._entry("model", checkpoint=str(checkpoint), spec=spec.model_dump(mode="json"))
            )
            self._note_offline()
        return None

    # ------------------------------------------------------------------------------ offline record
    def _entry(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"kind": kind, "tracking_uri": self.uri, "run_id": self.run_id, **fields}

    def _to_record(self) -> None:
        """Move every unsent metric and upload into the offline record (the sender stops retrying)."""
        self._give_up.set()
        with self._lock:
            metrics, self._outbox = self._outbox, []
            uploads, self._uploads = list(self._uploads.values()), {}
            self._recorded += len(metrics)
        assert self.record is not None
        if metrics:
            rows = [[m.key, m.value, m.timestamp, m.step] for m in metrics]
            append_record(self.record, self._entry("metrics", metrics=rows))
        for local, artifact_path, temporary in uploads:
            keep = local
            if temporary:  # the figures' temp folder would be removed: keep a copy beside the record
                keep = self.record.with_name(self.record.name + ".files") / f"{artifact_path or 'root'}".replace(
                    "/", "_"
                )
                shutil.copytree(local, keep, dirs_exist_ok=True)
                shutil.rmtree(local, ignore_errors=True)
            append_record(self.record, self._entry("artifacts", local_path=str(keep), artifact_path=artifact_path))
        self._note_offline()

    def _note_offline(self) -> None:
        if not self.offline:
            self.offline = True
            log.warning(
                "MLflow at %s did not take everything; the rest is in %s: send it later with "
                "`hierseg replay-tracking --record %s`",
                self.uri, self.record, self.record,
            )  # fmt: skip

    # ------------------------------------------------------------------------------ sender thread
    def _queue_upload(self, local: Path, artifact_path: str | None, temporary: bool) -> None:
        with self._lock:
            key = next(self._keys)
            self._uploads[key] = (local, artifact_path, temporary)
        self._jobs.put(lambda: self._upload(key))

    def _send_loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job()
            except Exception as e:  # a bug in one upload must not stop the sender
                log.warning("MLflow at %s: %s", self.uri, e)
            finally:
                self._jobs.task_done()

    def _send_metrics(self) -> None:
        while not self._give_up.is_set():
            with self._lock:
                chunk = self._outbox[:1000]  # MLflow's per-request metric limit
            if not chunk or not self._retry(
                lambda c=chunk: self.client.log_batch(self.run_id, metrics=c), "log metrics"
            ):
                return  # kept in the outbox: resent with the next batch (or recorded at the end)
            with self._lock:
                if self._outbox[: len(chunk)] == chunk:  # not already moved to the offline record
                    del self._outbox[: len(chunk)]

    def _upload(self, key: int) -> None:
        with self._lock:
            item = self._uploads.get(key)
        if item is None or self._give_up.is_set():
            return
        local, artifact_path, temporary = item
        send = self.client.log_artifacts if local.is_dir() else self.client.log_artifact
        if self._retry(lambda: send(self.run_id, str(local), artifact_path), "log artifacts"):
            with self._lock:
                self._uploads.pop(key, None)
            if temporary:
                shutil.rmtree(local, ignore_errors=True)

    def _retry(self, call: Callable[[], Any], what: str) -> bool:
        delay, deadline = 1.0, time.monotonic() + self.retry_s
        while not self._give_up.is_set():
            try:
                call()
                return True
            except Exception as e:  # network errors come in many types; never kill training for them
                if time.monotonic() > deadline:
                    warnings.warn(f"MLflow at {self.uri}: could not {what} ({e}); will retry later", stacklevel=2)
                    return False
                log.warning("MLflow at %s: %s failed (%s); retrying in %.0fs", self.uri, what, e, delay)
                self._give_up.wait(delay)
                delay = min(delay * 2, 30.0)
        return False


# ------------------------------------------------------------------------------ bounds and record
FINAL_TIMEOUT_ENV = "HIERSEG_TRACKING_FINAL_TIMEOUT_S"
_offline_record: Path | None = None


def final_timeout_s() -> float:
    """Seconds the end of a run waits for MLflow per step (metrics, model, run status); default 60."""
    try:
        return max(0.0, float(os.environ.get(FINAL_TIMEOUT_ENV, "60")))
    except ValueError:
        raise ValueError(f"{FINAL_TIMEOUT_ENV}={os.environ[FINAL_TIMEOUT_ENV]!r}: expected seconds, e.g. 60") from None


def set_offline_record(path: Path | None) -> None:
    """Where trackers created in this process (and :func:`end_run`) keep what MLflow did not take.

    Set by the owner of the run folder (the checkpointer on rank 0, the launcher on the driver), so the
    record lies beside the checkpoints without threading a path through the training loop.
    """
    global _offline_record
    _offline_record = None if path is None else Path(path)


def offline_record() -> Path | None:
    return _offline_record


def append_record(path: Path, entry: dict[str, Any]) -> None:
    """One JSON line, appended and fsynced (O_APPEND: the driver and rank 0 may both write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def bounded(call: Callable[[], Any], timeout_s: float) -> tuple[bool, Any]:
    """Run ``call`` in a daemon thread for at most ``timeout_s`` (or until SIGTERM/SIGINT).

    Returns ``(True, result)`` or ``(False, reason)``. A call still blocked in MLflow's own HTTP retries
    is left behind: it cannot outlive the process, and the caller records what it was doing.
    """
    done, box = threading.Event(), {}

    def target() -> None:
        try:
            box["result"] = call()
        except Exception as e:
            box["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        finally:
            done.set()

    threading.Thread(target=target, name="hierseg-mlflow-bounded", daemon=True).start()
    interrupted = threading.Event()
    with _interrupt_sets(interrupted):
        deadline = time.monotonic() + timeout_s
        while not done.wait(0.05) and time.monotonic() < deadline and not interrupted.is_set():
            pass
    if "result" in box or (done.is_set() and "error" not in box):
        return True, box.get("result")
    if "error" in box:
        return False, box["error"]
    return False, "interrupted" if interrupted.is_set() else f"no answer within {timeout_s:.0f} s ({FINAL_TIMEOUT_ENV})"


@contextlib.contextmanager
def _interrupt_sets(event: threading.Event) -> Iterator[None]:
    """While inside, SIGTERM/SIGINT set ``event`` (and still reach the previous handler), so a user
    waiting on a dead server can cut the wait short; only the main thread can install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        event.set()
        prev = previous.get(signum)
        if callable(prev) and prev is not signal.default_int_handler:
            prev(signum, frame)

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, prev in previous.items():
            signal.signal(sig, prev)


# ------------------------------------------------------------------------------------- driver side
_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks")
SQLITE_HEADER = b"SQLite format 3\x00"


def check_tracking_uri(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, before any worker starts, when the tracking store cannot be used; names the URI."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    if scheme and scheme not in _SCHEMES:
        close = closest(scheme, _SCHEMES)
        hint = f" (did you mean {close}://?)" if close else ""
        raise ConnectionError(
            f"MLflow tracking URI {uri}: unknown scheme {scheme!r}{hint}; use http://host:port, https://host or "
            "sqlite:///path/to/mlflow.db"
        )
    if scheme in ("http", "https"):
        _check_server(uri, timeout_s)
    elif scheme == "sqlite":
        _check_sqlite(uri, Path(uri.removeprefix("sqlite:///")))


def _check_server(uri: str, timeout_s: float) -> None:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
            if r.status != 200:
                raise OSError(f"HTTP {r.status}")
    except (OSError, urllib.error.URLError, ValueError) as e:
        raise ConnectionError(
            f"MLflow tracking server {uri} is unreachable ({e}); start it (deploy/mlflow/server.sh) "
            "or set tracking.uri to a reachable server or a sqlite:/// file"
        ) from None


def _check_sqlite(uri: str, db: Path) -> None:
    """The folder must take new files (SQLite writes journals beside the database), and an existing
    file must be a writable SQLite database: MLflow's own errors come after minutes of retries."""
    parent = db.parent
    try:
        probe_writable(parent)
    except OSError as e:
        raise ConnectionError(
            f"MLflow tracking store {uri}: cannot write in {parent} ({e.strerror or e}); make the folder writable "
            "or point tracking.uri at a sqlite:/// file in a writable folder"
        ) from None
    if not db.exists():
        return
    try:
        with open(db, "r+b") as f:
            header = f.read(len(SQLITE_HEADER))
    except OSError as e:
        raise ConnectionError(
            f"MLflow tracking store {uri}: cannot open {db} for writing ({e.strerror or e})"
        ) from None
    if header and header != SQLITE_HEADER:
        raise ConnectionError(
            f"MLflow tracking store {uri}: {db} is not an SQLite database; point tracking.uri at the right file "
            "or at a new one (it is created on first use)"
        )
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=5)) as con:
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as e:
        raise ConnectionError(f"MLflow tracking store {uri}: {db} is not a usable SQLite database ({e})") from None


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


def experiment_id(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, created if missing."""
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else create_experiment(client, name, uri)


def create_experiment(client: Any, name: str, uri: str) -> str:
    """Create experiment ``name``; if it already exists, its id. The jobs of a Slurm array start together
    and race to create it: the loser reads the winner's experiment instead of failing."""
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, artifact_location(uri))
    except MlflowException as e:
        exp = client.get_experiment_by_name(name)
        if exp is None or e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return exp.experiment_id


def start_run(spec: JobSpec, launcher: str) -> str:
    """Create (or reuse, on resume) the job's one MLflow run; log params, tags and the spec."""
    from mlflow.tracking import MlflowClient

    uri = spec.tracking.uri
    client = MlflowClient(tracking_uri=uri)
    exp_id = experiment_id(client, spec.tracking.experiment, uri)
    tags = {
        "hierseg.version": __version__,
        "hierseg.git_commit": git_commit(),
        "hierseg.launcher": launcher,
        **spec.tracking.tags,
    }
    run = client.create_run(exp_id, run_name=spec.tracking.run_name or spec.run.name, tags=tags)
    from mlflow.entities import Param

    try:
        params = [Param(k, str(v)[:_PARAM_MAX]) for k, v in spec.flat().items()]
        for i in range(0, len(params), 100):
            client.log_batch(run.info.run_id, params=params[i : i + 100])
        client.log_text(run.info.run_id, spec.to_yaml(), "spec.yaml")
    except BaseException:  # a half-started run must not stay RUNNING forever
        bounded(lambda: client.set_terminated(run.info.run_id, status="FAILED"), final_timeout_s())
        raise
    return run.info.run_id


def end_run(uri: str, run_id: str, status: str) -> bool:
    """Mark the run ended, bounded by :func:`final_timeout_s`; when MLflow does not answer, the status
    goes to the offline record (if one is set) and ``False`` is returned."""
    from mlflow.tracking import MlflowClient

    ok, why = bounded(lambda: MlflowClient(tracking_uri=uri).set_terminated(run_id, status=status), final_timeout_s())
    if not ok:
        record = offline_record()
        where = "nowhere (no run folder)"
        if record is not None:
            append_record(record, {"kind": "end", "tracking_uri": uri, "run_id": run_id, "status": status})
            where = f"{record}; send it with `hierseg replay-tracking --record {record}`"
        log.warning("MLflow at %s: could not mark run %s %s (%s); recorded in %s", uri, run_id, status, why, where)
    return ok


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


# ------------------------------------------------------------------------------------- replay
def _replay_entry(client: Any, uri: str, entry: dict[str, Any]) -> str:
    """Send one record line; returns what was sent (for the summary)."""
    from mlflow.entities import Metric

    run_id, kind = entry["run_id"], entry["kind"]
    if kind == "metrics":
        metrics = [Metric(k, float(v), int(t), int(s)) for k, v, t, s in entry["metrics"]]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
        return f"{len(metrics)} metrics"
    if kind == "artifacts":
        local = Path(entry["local_path"])
        if local.is_dir():
            client.log_artifacts(run_id, str(local), entry.get("artifact_path"))
        else:
            client.log_artifact(run_id, str(local), entry.get("artifact_path"))
        return f"artifacts {entry.get('artifact_path') or local.name}"
    if kind == "model":
        from hierseg.serve.pyfunc import log_checkpoint_model

        spec = JobSpec.model_validate(entry["spec"])
        return f"model {log_checkpoint_model(uri, run_id, Path(entry['checkpoint']), spec)}"
    if kind == "end":
        client.set_terminated(run_id, status=entry["status"])
        return f"run status {entry['status']}"
    raise ValueError(f"unknown record kind {kind!r}")


def replay(record: Path, tracking_uri: str | None = None) -> list[str]:
    """Send an offline record into MLflow, line by line, in order.

    A line is dropped from the record only once MLflow took it, so a failed replay can be rerun and
    continues where it stopped. A finished record is renamed ``<record>.replayed`` (kept, not deleted).
    """
    from mlflow.tracking import MlflowClient

    if not record.is_file():
        raise ValueError(
            f"--record {record}: no such file (it is written beside the checkpoints as tracking_offline.jsonl)"
        )
    lines = [line for line in record.read_text().splitlines() if line.strip()]
    done: list[str] = []
    checked: set[str] = set()
    for i, line in enumerate(lines):
        try:
            entry = json.loads(line)
            uri = tracking_uri or entry["tracking_uri"]
            if uri not in checked:  # seconds, naming the URI, instead of MLflow's minutes of retries
                check_tracking_uri(uri)
                checked.add(uri)
            done.append(_replay_entry(MlflowClient(tracking_uri=uri), uri, entry))
        except Exception as e:
            from hierseg.train.checkpoint import atomic_write_text

            atomic_write_text("".join(rest + "\n" for rest in lines[i:]), record)  # keep what was not sent
            raise ValueError(
                f"--record {record}: line {i + 1} could not be sent ({type(e).__name__}: {e}); {len(done)} line(s) "
                "sent and removed from the record; fix the cause and rerun the same command"
            ) from None
    os.replace(record, record.with_name(record.name + ".replayed"))
    return done


def replay_main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="hierseg replay-tracking",
        description="Send what a run could not log to MLflow (its tracking_offline.jsonl) into MLflow.",
    )
    ap.add_argument("--record", required=True, type=Path, help="<run.storage_path>/<run.name>/tracking_offline.jsonl")
    ap.add_argument("--tracking-uri", default=None, help="MLflow store (default: the one each line names)")
    args = ap.parse_args(argv)
    try:
        sent = replay(args.record, args.tracking_uri)
    except (ValueError, ConnectionError) as e:
        print(f"hierseg replay-tracking: {e}", file=sys.stderr)
        return 2
    print(f"hierseg replay-tracking: sent {len(sent)} record line(s) ({'; '.join(sent)}); record kept as "
          f"{args.record.name}.replayed")  # fmt: skip
    return 0
