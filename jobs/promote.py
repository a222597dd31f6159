"""Point a registry alias at the best run: ``python jobs/promote.py --spec S.yaml [--metric M --mode max]``.

Also ``hierseg promote``; see ``--help``.
"""

import sys

from hierseg.registry import main

if __name__ == "__main__":
    sys.exit(main())
