"""Streaming loaders: exactly-once validation over real processes, resume, filtering, bad samples."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hierseg.data.augment import augment
from hierseg.data.loader import decode_sample, iter_raw_samples, random_crop, resolve_shards
from hierseg.data.shards import write_tar_atomic
from hierseg.spec import AugmentSpec, DataSpec
from tests.data_helpers import build, digest, train_loader, val_loader, write_pairs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    write_pairs(root, 5)
    # 5 images x 4 patches = 20 samples in 5 shards (odd), all in one split; min-valid 0 keeps all-uncertain ones
    assert build(root, root / "s", "--val-frac", "0", "--samples-per-shard", "4", "--min-valid", "0") == 0
    return root / "s" / "train"


def test_resolve_shards_forms_and_errors(shard_dir) -> None:
    assert len(resolve_shards(str(shard_dir))) == 5
    assert len(resolve_shards(str(shard_dir / "shard-*.tar"))) == 5
    assert len(resolve_shards(str(shard_dir / "shard-{000000..000002}.tar"))) == 3
    assert resolve_shards(f"pipe:cat {shard_dir}/shard-00000{{0..1}}.tar") == [
        f"pipe:cat {shard_dir}/shard-000000.tar",
        f"pipe:cat {shard_dir}/shard-000001.tar",
    ]
    with pytest.raises(ValueError, match="no shards found for .*nothing-"):
        resolve_shards(str(shard_dir / "nothing-*.tar"))


def test_two_ranks_two_workers_exactly_once(shard_dir, tmp_path) -> None:
    all_samples = [
        digest(decode_sample(r, {"mode": "zscore"}, 12)[0])
        for url in resolve_shards(str(shard_dir))
        for r in iter_raw_samples(url)
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests._data_rank_worker", str(shard_dir), str(r), "2", str(tmp_path / f"{r}.json")],
            cwd=ROOT,
            env=env,
        )
        for r in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    seen = results[0]["val"] + results[1]["val"]
    assert sorted(seen) == sorted(all_samples) and len(set(seen)) == 20
    assert [r["train_steps"] for r in results] == [25, 25]
    assert sum(r["val_batches"] for r in results) == 20  # whole stored tiles, one at a time
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    assert sum(r["val_valid"] for r in results) == sum(manifest["class_histogram"])  # every valid pixel once


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_gives_the_same_batches(shard_dir, num_workers) -> None:
    data = DataSpec(train=str(shard_dir), val=str(shard_dir), batch_size=3, num_workers=num_workers, shuffle_buffer=5,
                    patch_size=40)  # fmt: skip
    aug = data.model_copy(update={"augment": AugmentSpec(elastic=0.5, blur=0.5)})
    ref_stream = iter(train_loader(aug, rank=1, world_size=2, batch_size=3, seed=7))
    ref = [next(ref_stream) for _ in range(9)]
    del ref_stream
    first = train_loader(aug, rank=1, world_size=2, batch_size=3, seed=7)
    it = iter(first)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    del it
    resumed = train_loader(aug, rank=1, world_size=2, batch_size=3, seed=7)
    resumed.load_state_dict(state)
    it = iter(resumed)
    for want in ref[5:]:
        got = next(it)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert all((lab >= 0).flatten(1).any(1).all() for _, lab in ref)  # all-uncertain patches never sampled


def test_class_balanced_runs(shard_dir) -> None:
    data = DataSpec(train=str(shard_dir), val=str(shard_dir), batch_size=2, num_workers=0, class_balanced=True,
                    patch_size=48)  # fmt: skip
    images, labels = next(iter(train_loader(data, rank=0, world_size=1, batch_size=2, seed=0)))
    assert images.shape == (2, 1, 48, 48) and labels.dtype == torch.int16


def test_crops_are_fresh_per_visit_deterministic_per_seed() -> None:
    """The crop position comes from the per-sample generator: same seed same crop, other seeds other crops."""
    image = torch.arange(100 * 90, dtype=torch.float32).view(1, 100, 90)
    label = torch.zeros(100, 90, dtype=torch.int64)

    def origin(seed: int) -> tuple[int, int]:
        crop, _ = random_crop(image, label, 32, torch.Generator().manual_seed(seed))
        return divmod(int(crop[0, 0, 0]), 90)

    origins = [origin(s) for s in range(50)]
    assert origins == [origin(s) for s in range(50)]
    assert len(set(origins)) > 40 and all(0 <= y <= 68 and 0 <= x <= 58 for y, x in origins)
    small, small_label = random_crop(image[:, :20, :20], label[:20, :20], 32, torch.Generator().manual_seed(0))
    assert small.shape == (1, 32, 32) and int((small_label == -1).sum()) == 32 * 32 - 400  # padding is uncertain


def test_class_balanced_centres_on_rare_class_and_never_stalls() -> None:
    """Oversampling centres crops on a present weighted class; with none present it falls back to uniform."""
    label = torch.full((200, 200), 2, dtype=torch.int64)
    label[150:154, 20:24] = 10  # a rare class in one corner
    image = torch.zeros(1, 200, 200)
    weights = torch.zeros(12)
    weights[10] = 1.0
    for seed in range(20):
        _, lab = random_crop(image, label, 32, torch.Generator().manual_seed(seed), weights)
        assert (lab == 10).any()
    no_rare = torch.full((200, 200), 2, dtype=torch.int64)
    crops = [random_crop(image, no_rare, 32, torch.Generator().manual_seed(s), weights)[1] for s in range(5)]
    assert all(c.shape == (32, 32) for c in crops)


def _corrupt_shard(folder: Path) -> None:
    src = next(iter_raw_samples(str(folder / "shard-000000.tar")))
    good = [(f"{src['__key__']}.{k}", src[k]) for k in ("image.npy", "json", "label.npy")]
    bad = [("broken_000001.image.npy", src["image.npy"]), ("broken_000001.label.npy", b"not npy")]
    write_tar_atomic(folder / "shard-000000.tar", good + bad)
    (folder / "manifest.json").write_text(json.dumps({"shards": [{"name": "shard-000000.tar", "num_samples": 2}]}))


def test_bad_sample_stop_names_shard_and_key_skip_warns(tmp_path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    write_pairs(tmp_path / "p", 1)
    build(tmp_path / "p", tmp_path / "s", "--val-frac", "0", "--samples-per-shard", "1")
    (tmp_path / "s" / "train" / "shard-000000.tar").rename(folder / "shard-000000.tar")
    _corrupt_shard(folder)
    data = DataSpec(train=str(folder), val=str(folder), batch_size=1, num_workers=0)
    with pytest.raises(ValueError, match=r"broken_000001.*shard-000000\.tar.*on_bad_sample=skip"):
        list(val_loader(data, rank=0, world_size=1))
    skip = data.model_copy(update={"on_bad_sample": "skip"})
    with pytest.warns(UserWarning, match="1 skipped"):
        assert len(list(val_loader(skip, rank=0, world_size=1))) == 1


def test_label_out_of_range_and_old_format_name_the_culprit(tmp_path) -> None:
    """A label value beyond the fine classes and sets names its sample; old grid shards give the rebuild command."""
    write_pairs(tmp_path / "p", 1)
    build(tmp_path / "p", tmp_path / "s", "--val-frac", "0", "--samples-per-shard", "1")
    folder = tmp_path / "s" / "train"
    src = next(iter_raw_samples(str(folder / "shard-000000.tar")))
    label = np.load(io.BytesIO(src["label.npy"]))
    label[0, 0] = 50
    buf = io.BytesIO()
    np.save(buf, label)
    members = [(f"{src['__key__']}.{k}", src[k]) for k in ("image.npy", "json")]
    write_tar_atomic(folder / "shard-000000.tar", [*members, (f"{src['__key__']}.label.npy", buf.getvalue())])
    data = DataSpec(train=str(folder), val=str(folder), batch_size=1, num_workers=0)
    with pytest.raises(ValueError, match=r"shard-000000\.tar: label value 50 is outside -1\.\.11"):
        list(val_loader(data, rank=0, world_size=1))
    # a cut-short .npy member inside an intact tar says so
    short = {**src, "image.npy": src["image.npy"][:-10]}
    with pytest.raises(ValueError, match=r"holds \d+ of its \d+ data bytes; the shard is damaged"):
        decode_sample(short, {"mode": "zscore"}, 12)
    # training checks the crop it converts: one covering the bad pixel names the sample too
    covering = DataSpec(train=str(folder), val=str(folder), batch_size=1, num_workers=0, patch_size=128)
    with pytest.raises(ValueError, match=r"shard-000000\.tar: label value 50 is outside -1\.\.11"):
        next(iter(train_loader(covering, rank=0, world_size=1, batch_size=1, seed=0)))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format"] = "hierseg-shards/1"
    manifest["command"] = "hierseg make-shards --images a --labels b --out c --patch-size 256 --stride 172"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    rebuild = "hierseg make-shards --images a --labels b --out c --overwrite"
    with pytest.raises(ValueError, match=rf"older hierseg.*{rebuild}"):
        resolve_shards(str(folder))


def test_augment_keeps_label_values_and_shapes() -> None:
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 32, 32)
    label = torch.randint(-1, 12, (32, 32))
    spec = AugmentSpec(elastic=1.0, blur=1.0)
    for _ in range(5):
        img, lab = augment(image, label, spec, gen)
        assert img.shape == image.shape and lab.shape == label.shape and lab.dtype == torch.int64
        assert set(lab.unique().tolist()) <= set(label.unique().tolist())


def test_flips_and_rotations_equal_numpy_applied_step_by_step() -> None:
    """geometric() folds flips and rot90 into one copy: equal to np.flip x, np.flip y, np.rot90 k done in turn."""
    from hierseg.data.augment import geometric

    spec = AugmentSpec(contrast=0, gamma=0, noise=0)
    ks = set()
    for seed in range(40):
        image, label = torch.randn(2, 5, 7), torch.randint(-1, 12, (5, 7))
        got_image, got_label = geometric(image, label, spec, torch.Generator().manual_seed(seed))
        draws = torch.Generator().manual_seed(seed)  # the documented draws: x flip, y flip, then k
        flip_x, flip_y = float(torch.rand((), generator=draws)) < 0.5, float(torch.rand((), generator=draws)) < 0.5
        k = int(torch.randint(0, 4, (), generator=draws))
        ks.add((flip_x, flip_y, k))
        for got, ref in ((got_image, image.numpy()), (got_label, label.numpy())):
            ref = np.flip(ref, -1) if flip_x else ref
            ref = np.flip(ref, -2) if flip_y else ref
            np.testing.assert_array_equal(got.numpy(), np.rot90(ref, k, axes=(-2, -1)))
            assert got.is_contiguous()
    assert len(ks) >= 12  # most of the 16 combinations were exercised


def test_intensity_augmentation_keeps_z_scored_images_intact() -> None:
    """Gamma/contrast/noise act relative to the patch's spread: a z-scored patch is not flattened to [0, 1]."""
    from hierseg.data.augment import intensity

    image = torch.randn(1, 64, 64, generator=torch.Generator().manual_seed(0))
    spec = AugmentSpec(contrast=0.2, gamma=0.2, noise=0.1)
    for seed in range(5):
        out = intensity(image, spec, torch.Generator().manual_seed(seed))
        assert float(out.min()) < -1.5 and float(out.max()) > 1.5  # still z-score-like, nothing clamped
        corr = torch.corrcoef(torch.stack([image.flatten(), out.flatten()]))[0, 1]
        assert float(corr) > 0.9  # the same image, jittered
