"""Point a registry alias at the best run: ``python jobs/promote.py --spec S.yaml [--metric M --mode max]``.

Also ``hierseg promote``; see ``--help``. Errors end as one line (``--debug``: traceback).
"""

import sys

from hierseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["promote", *sys.argv[1:]]))
