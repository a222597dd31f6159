"""``hierseg <verb>``: one console script for every job; each verb lives in its own module."""

from __future__ import annotations

import importlib
import sys

# verb -> "module:function"; imported lazily so `hierseg --help` does not pay for torch/ray/mlflow.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("hierseg.train.cli:main", "train a model from a job spec (Ray, torchrun or local)"),
    "make-shards": ("hierseg.data.shards:main", "convert images/volumes + labels into WebDataset shards"),
    "synth": ("hierseg.data.synth:main", "generate synthetic EM-like images and labels"),
    "predict": ("hierseg.infer:main", "segment images or stacks with a trained model"),
    "evaluate": ("hierseg.evaluate:main", "per-class IoU/Dice of a model on labelled shards"),
    "promote": ("hierseg.registry:main", "pick the best run by a metric and point a registry alias at it"),
    "sweep": ("hierseg.sweep:main", "expand a sweep into trials; run locally or as a Slurm array"),
}


def usage() -> str:
    lines = ["usage: hierseg <command> [options]", "", "commands:"]
    lines += [f"  {verb:<12} {help_}" for verb, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


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
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
