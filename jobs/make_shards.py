"""Build WebDataset shards from EM images/volumes + labels: ``python jobs/make_shards.py --help``."""

import sys

from hierseg.data.shards import main

if __name__ == "__main__":
    sys.exit(main())
