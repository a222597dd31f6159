"""Helper process of tests/test_reliability.py: a tracker whose MLflow server is gone, ending a run.

    python -m tests._rel_tracker URI RUN_ID RECORD

Logs a few metrics, prints "waiting", then does the end of a run (bounded wait, model, run status),
so the test can send SIGTERM while it waits and check the offline record.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hierseg.tracking import MlflowTracker, end_run, set_offline_record


def main() -> int:
    uri, run_id, record = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    set_offline_record(record)
    tracker = MlflowTracker(uri, run_id, retry_s=600.0)  # a sender that would retry for 10 minutes
    tracker.log_metrics({"train/loss": 0.5, "train/lr": 0.001}, step=7)
    print("waiting", flush=True)
    t0 = time.monotonic()
    sent = tracker.wait()
    end_run(uri, run_id, "FINISHED")
    print(f"done sent={sent} after {time.monotonic() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
