"""Train from a job spec: ``python jobs/train.py --spec spec.yaml [--set key.path=value ...] [--debug]``.

Under ``ray job submit`` it joins that cluster; under torchrun (Slurm) rank 0 owns the MLflow run;
``--launcher local`` runs one process without Ray. Errors end as one line (``--debug``: traceback).
"""

import sys

from hierseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
