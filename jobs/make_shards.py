"""Build WebDataset shards from EM images/volumes + labels: ``python jobs/make_shards.py --help``."""

import sys

from hierseg.data.shards import main

if __name__ == "__main__":
    from hierseg.cli import run_verb

    sys.exit(run_verb("make-shards", main, sys.argv[1:]))
