"""Segment an image or stack: ``python jobs/predict.py --model models:/NAME@champion --input X --output Y``.

Also ``hierseg predict``; see ``--help``. Errors end as one line (``--debug``: traceback).
"""

import sys

from hierseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
