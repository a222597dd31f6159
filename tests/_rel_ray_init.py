"""Helper process of tests/test_reliability.py: hierseg's embedded Ray start next to a stale cluster record.

    RAY_TMPDIR=... python -m tests._rel_ray_init

Plants a ``ray_current_cluster`` file naming a dead GCS (what a killed ``ray start --head`` leaves), starts
Ray the way ``jobs/train.py`` does, and prints the addresses the cluster's nodes and GCS listen on and the
niceness of this process and, for a worker, its niceness and its torch thread count.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from hierseg.spec import validate_spec
from hierseg.train.launch import init_ray


def _worker_probe() -> dict:
    import torch  # as a train function does: after Ray's setup hook and OMP_NUM_THREADS

    return {"nice": os.nice(0), "omp": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads()}


def main() -> int:
    for folder in (Path(os.environ["RAY_TMPDIR"]), Path(os.environ["RAY_TMPDIR"]) / "ray"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ray_current_cluster").write_text("192.0.2.2:6391")  # TEST-NET address: nobody answers
    spec = validate_spec(
        {"data": {"train": "x", "val": "y", "batch_size": 2}, "run": {"max_steps": 1, "num_workers": 1}}
    )
    import ray

    init_ray(spec)
    nodes = [n["NodeManagerAddress"] for n in ray.nodes()]
    seen = {"nodes": nodes, "gcs": ray.get_runtime_context().gcs_address, "nice": os.nice(0)}
    seen["worker"] = ray.get(ray.remote(_worker_probe).remote())
    print(json.dumps(seen), flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
