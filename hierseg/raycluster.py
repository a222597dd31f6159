"""Which Ray cluster to use, shared by training's launcher and blockwise prediction.

Why a module of its own: :mod:`hierseg.serve` joins or starts Ray the same way training does but never
imports :mod:`hierseg.train`. A cluster is joined only through ``RAY_ADDRESS``; a dead address fails in
seconds naming it; an embedded cluster binds to 127.0.0.1.
"""

from __future__ import annotations

import os
import socket


class PreflightError(ValueError):
    """The job cannot start: missing shards, unreachable tracking store, ..."""


def ray_address() -> str | None:
    """The cluster to join: ``RAY_ADDRESS`` (set by ``ray job submit`` and ``--ray-address``), else None."""
    return os.environ.get("RAY_ADDRESS") or None


def check_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """A ``host:port`` (or ``ray://host:port``) nobody answers at fails now, naming it, not after Ray's
    minutes of GCS retries. ``auto`` and other forms are left to Ray."""
    body = address.removeprefix("ray://")
    host, sep, port = body.rpartition(":")
    if not sep or not port.isdigit() or "/" in body:
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise PreflightError(
            f"RAY_ADDRESS={address}: no Ray cluster answers there ({e.strerror or e}); start it (ray start --head "
            "--node-ip-address=127.0.0.1), fix the address, or unset RAY_ADDRESS to train on a new local cluster"
        ) from None


RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def pin_ray_to_loopback() -> None:
    """Make the embedded cluster bind to 127.0.0.1.

    Why: Ray 2.60 turns ``_node_ip_address="127.0.0.1"`` (and ``ray start --node-ip-address=127.0.0.1``) into
    the machine's address (``services.resolve_ip_for_localhost``) unless its multi-node "cluster" mode is
    off, which is what this variable switches (Ray's default on Windows/macOS). Off, the GCS, raylet and
    workers listen on loopback only. The variable reaches the processes Ray starts; the constant covers
    this process, which may have imported Ray already.
    """
    os.environ[RAY_LOOPBACK_ENV] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def local_cluster_process_setup() -> None:
    """Run in every process of the embedded cluster (Ray's ``worker_process_setup_hook``).

    Why each step:
    - ``RAY_ADDRESS`` is pinned to this cluster: Ray Train's placement-group cleaner (a state-API call
      without an address) otherwise looks for "the" Ray instance on this machine and dies with a traceback
      ("Found multiple active Ray instances") when some other job's Ray runs here too.
    - Ray Train's controller sends the cluster autoscaler a resource request every 20 s and, when the answer
      takes over 5 s (a loaded machine), logs a warning with a traceback that Ray itself calls safe to
      ignore. A local cluster has no autoscaler, so that client's logger passes only errors (not with
      ``--debug``). A filter, not a level: the controller's ``logging.config.dictConfig`` later resets the
      levels of loggers under ``ray.train``.
    Clusters joined through ``RAY_ADDRESS`` are left as they are.

    It lives here, in a module that does not import torch: Ray sets ``OMP_NUM_THREADS`` (1 per CPU it gave
    the worker) after this hook, and a torch imported before that sizes its pool to the whole machine.
    """
    import logging

    import ray
    from ray.train.v2._internal.execution.scaling_policy import autoscaling_coordinator_client as client

    from hierseg.cli import debug_requested

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    if not debug_requested():
        logging.getLogger(client.__name__).addFilter(lambda record: record.levelno >= logging.ERROR)
