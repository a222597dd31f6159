"""``hierseg <verb>``: one console script for every job; each verb lives in its own module.

Every verb (and every ``jobs/*.py`` script) runs through :func:`run_verb`: an error ends as one line
``hierseg <verb>: <message>`` and exit 1 (argument and spec errors keep their own exit 2); the
traceback is printed only with ``--debug`` (or ``HIERSEG_DEBUG=1``). Errors raised on Ray workers
arrive wrapped (``TrainingFailedError`` -> worker failures -> ``RayTaskError``); the message shown is
the root cause's, which is the one hierseg wrote. Under torchrun the line also goes into the rank's
error file, so torchrun's failure summary and ``hierseg torchrun`` show it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Callable

# verb -> "module:function"; imported lazily so `hierseg --help` does not pay for torch/ray/mlflow.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("hierseg.train.cli:main", "train a model from a job spec (Ray, torchrun or local)"),
    "torchrun": ("hierseg.train.torchrun:main", "torchrun that checks the layout first and ends in one line"),
    "make-shards": ("hierseg.data.shards:main", "convert images/volumes + labels into WebDataset shards"),
    "synth": ("hierseg.data.synth:main", "generate synthetic EM-like images and labels"),
    "predict": ("hierseg.serve.infer:main", "segment images or stacks with a trained model"),
    "evaluate": ("hierseg.serve.evaluate:main", "per-class IoU/Dice of a model on labelled shards"),
    "promote": ("hierseg.registry:main", "pick the best run by a metric and point a registry alias at it"),
    "sweep": ("hierseg.sweep:main", "expand a sweep into trials; run locally or as a Slurm array"),
    "replay-tracking": ("hierseg.tracking:replay_main", "send an offline tracking record into MLflow"),
}

# Exception types whose message alone says what happened; any other type is shown with its name
# (a bare KeyError "'x'" means nothing without it).
_SELF_EXPLAINING = (ValueError, RuntimeError, OSError, ConnectionError)


def usage() -> str:
    lines = ["usage: hierseg <command> [options] [--debug]", "", "commands:"]
    lines += [f"  {verb:<16} {help_}" for verb, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def root_cause(exc: BaseException) -> BaseException:
    """The exception a Ray worker (or the Ray Train controller) actually raised.

    Only Ray's wrappers are unwrapped: hierseg's own ``raise Clear(...) from e`` keeps the clear outer
    message, so ``__cause__`` chains are not followed.
    """
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        failures = getattr(exc, "worker_failures", None)  # ray.train.WorkerGroupError: rank -> error
        if isinstance(failures, dict) and failures:
            exc = failures[min(failures)]
        elif isinstance(getattr(exc, "controller_failure", None), BaseException):  # ray.train.ControllerError
            exc = exc.controller_failure
        elif isinstance(getattr(exc, "_base_exc", None), BaseException):  # UserExceptionWithTraceback
            exc = exc._base_exc
        elif type(exc).__module__.startswith("ray") and isinstance(getattr(exc, "cause", None), BaseException):
            exc = exc.cause  # RayTaskError(...) and its dual subclasses
        else:
            break
    return exc


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` without any traceback text Ray may have folded into it."""
    text = str(exc)
    if "Original Traceback (most recent call last)" in text:  # torch's DataLoader re-raise: the original is last
        last = [line.strip() for line in text.splitlines() if line.strip()][-1]
        text = last.removeprefix(f"{type(exc).__name__}:").strip()
    text = text.split("Traceback (most recent call last)")[0].strip()
    text = " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__
    if type(exc).__module__.startswith("hierseg") or type(exc) in _SELF_EXPLAINING:
        return text
    return f"{type(exc).__name__}: {text}"


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= minimum``, else a usage error naming the value (exit 2)."""

    what = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    return parse


def debug_requested() -> bool:
    """``--debug`` (exported by :func:`run_verb`) or ``HIERSEG_DEBUG=1``: show tracebacks, in child processes too."""
    return os.environ.get("HIERSEG_DEBUG", "") not in ("", "0")


def report_error(verb: str, message: str) -> None:
    """Print hierseg's one line; under torchrun also write it to this rank's error file.

    Why the error file: torchrun's summary of a failed rank shows that file's message (otherwise only
    "To enable traceback see ..."), and ``hierseg torchrun`` ends with it as its one line.
    """
    print(f"hierseg {verb}: {message}", file=sys.stderr)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:  # the string form torch.distributed.elastic reads as the whole message
            with open(error_file, "w") as f:
                json.dump({"message": f"hierseg {verb}: {message}", "timestamp": int(time.time())}, f)
        except OSError:
            pass  # the line is on stderr already; the summary falls back to torchrun's own text


def run_verb(verb: str, func: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """Run one verb: one line and exit 1 on error, the traceback only with ``--debug``."""
    if "--debug" in argv:
        os.environ["HIERSEG_DEBUG"] = "1"  # processes this verb starts (torchrun's ranks) follow
    debug = debug_requested()
    argv = [a for a in argv if a != "--debug"]
    try:
        return int(func(argv) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        report_error(verb, "interrupted")
        return 130
    except Exception as e:
        if debug:
            raise
        report_error(verb, f"{one_line(root_cause(e))} (rerun with --debug for the traceback)")
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in COMMANDS:
        print(f"hierseg: unknown command {verb!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func = COMMANDS[verb][0].split(":")
    return run_verb(verb, lambda args: getattr(importlib.import_module(module), func)(args), rest)


if __name__ == "__main__":
    sys.exit(main())
