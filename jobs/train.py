"""Train from a job spec: ``python jobs/train.py --spec spec.yaml [--set key.path=value ...]``.

Under ``ray job submit`` it joins that cluster; under torchrun (Slurm) rank 0 owns the MLflow run;
``--launcher local`` runs one process without Ray.
"""

import sys

from hierseg.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
