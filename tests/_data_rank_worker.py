"""One rank of the multi-process loader test (run as a real process by test_data_loader.py)."""

import json
import sys

from hierseg.spec import DataSpec
from tests.data_helpers import digest, train_loader, val_loader

if __name__ == "__main__":
    shard_dir, rank, world, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    data = DataSpec(train=shard_dir, val=shard_dir, batch_size=4, num_workers=2, shuffle_buffer=4, patch_size=48)
    val = val_loader(data, rank=rank, world_size=world)
    seen, valid = [], 0
    for images, labels in val:
        seen += [digest(img) for img in images]
        valid += int(((labels >= 0) & (labels < 12)).sum())
    stream = iter(train_loader(data, rank=rank, world_size=world, batch_size=2, seed=0))
    steps = 0
    for _ in range(25):  # more than one pass over this rank's shards
        images, labels = next(stream)
        assert images.shape[0] == 2 and bool((labels >= 0).flatten(1).any(1).all())
        steps += 1
    with open(out, "w") as f:
        json.dump({"val": seen, "val_batches": len(val), "val_valid": valid, "train_steps": steps}, f)
