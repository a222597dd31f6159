"""``hierseg torchrun [torchrun options] jobs/train.py --spec S.yaml [--set k=v ...]``: torchrun, ending in one line.

Why a launcher of our own: plain ``torchrun`` ends every failed job with its own ``ChildFailedError``
traceback and failure summary after the ranks' one-line messages, and a layout that cannot work (more
processes than samples in the batch) is found only once every process has started. This runs
``torch.distributed.run`` in this process with the same options, so it behaves as torchrun does, but:

- the layout (``nnodes x nproc_per_node`` processes over ``data.batch_size``) and the spec are checked
  before any process starts, by the same functions every rank uses;
- a failed rank ends the job as one line, ``hierseg torchrun: rank N failed: <that rank's message>``,
  read from the rank's torchrun error file (written by :func:`hierseg.cli.report_error`), with the
  rank's exit code. ``--debug`` shows torchrun's own report instead.

Plain ``torchrun ... jobs/train.py`` keeps working; its summary then carries hierseg's message too.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hierseg.cli import debug_requested, report_error


def world_sizes(args: Any) -> list[int]:
    """Every number of training processes torchrun may start with these options (one unless nnodes is MIN:MAX)."""
    from torch.distributed.run import determine_local_world_size, parse_min_max_nnodes

    min_nodes, max_nodes = parse_min_max_nnodes(args.nnodes)
    per_node = determine_local_world_size(args.nproc_per_node)
    return [nodes * per_node for nodes in range(min_nodes, max_nodes + 1)]


def check_layout(args: Any) -> None:
    """Load the training command's spec and check it against every possible world size; raise ``ValueError``."""
    script_args = _train_args(args)
    if script_args is None:
        return
    import torch

    from hierseg.spec import load_spec
    from hierseg.train.cli import parse_args
    from hierseg.train.context import DistContext
    from hierseg.train.loop import per_rank_batch

    train_args = parse_args(script_args)
    spec = load_spec(train_args.spec, train_args.overrides)
    for world in world_sizes(args):
        per_rank_batch(spec, DistContext(0, world, 0, torch.device("cpu"), "torchrun", False))


def _train_args(args: Any) -> list[str] | None:
    """The arguments of hierseg's training command (``jobs/train.py``, ``-m hierseg.train.cli`` or
    ``-m hierseg.cli train``), or None for any other script, which is launched unchecked as torchrun would."""
    script, rest = args.training_script, list(args.training_script_args)
    if args.module and script == "hierseg.cli" and rest[:1] == ["train"]:
        rest = rest[1:]
    elif not (script == "hierseg.train.cli" if args.module else Path(script).name == "train.py"):
        return None
    return rest if any(a == "--spec" or a.startswith("--spec=") for a in rest) else None


def failure_line(error: Any) -> tuple[str, int]:
    """One line and an exit code for torchrun's ``ChildFailedError``: the first failed rank's own message.

    A rank that wrote an error file and exited by itself comes first: torchrun stops the other ranks once one
    fails (they show as killed by SIGTERM, with or without an error file), and timestamps have one-second
    resolution, so torchrun's own "first failure" may be one of those.
    """

    def key(item: tuple[int, Any]) -> tuple[bool, bool, int, int]:
        rank, failure = item
        return not os.path.isfile(failure.error_file), failure.exitcode < 0, failure.timestamp, rank

    rank, failure = min(error.failures.items(), key=key)
    message = failure.message
    if isinstance(message, dict):  # a script decorated with torch's @record: "Type: message"
        message = message.get("message", "")
    if os.path.isfile(failure.error_file) and isinstance(message, str) and message:
        text = message
    elif failure.exitcode < 0:
        text = f"killed by {failure.signal_name()}"
    else:
        text = f"exit code {failure.exitcode}; its own output above says why"
    return f"rank {rank} failed: {text}", failure.exitcode if failure.exitcode > 0 else 1


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        check_layout(args)
    except ValueError as e:  # SpecError too
        report_error("torchrun", str(e))
        return 2
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        if debug_requested():
            raise
        line, code = failure_line(e)
        report_error("torchrun", line)
        return code
    return 0


if __name__ == "__main__":
    from hierseg.cli import run_verb

    sys.exit(run_verb("torchrun", main, sys.argv[1:]))
