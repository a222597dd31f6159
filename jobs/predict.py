"""Segment an image or stack: ``python jobs/predict.py --model models:/NAME@champion --input X --output Y``.

Also ``hierseg predict``; see ``--help``.
"""

import sys

from hierseg.infer import main

if __name__ == "__main__":
    sys.exit(main())
