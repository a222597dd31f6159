"""Blockwise prediction on a real private local Ray cluster (``hierseg predict --ray``): the output equals
whole-volume ``predict``, a rerun predicts only unfinished blocks (and a worker SIGKILLed meanwhile is
restarted and its block retried), an OME-Zarr output is read back by ome-zarr-py (axes, the input's voxel
size, the labels group), and bad inputs are one-line errors.

The model is a tiny untrained U-Net saved as a checkpoint folder, its heads sharpened so that every fine
class, coarse group and label value occurs; untrained, it has many near-ties, where argmax and float16
rounding show any numeric difference, which is what identity needs tested.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hierseg.serve.blockwise import DONE_ARRAY, RECORD_ATTR, BlockwiseResult, predict_blockwise
from hierseg.serve.infer import main as predict_main
from hierseg.serve.infer import parse_args
from tests.train_utils import ROOT, descendant_pids, sqlite_store, untrained_checkpoint

pytestmark = pytest.mark.timeout(240)
SHAPE = (3, 150, 170)
BLOCK = "2,64,72"  # divides none of the volume's sides: 2 x 3 x 3 blocks, cut at every far edge
FLAGS = ["--tile", "48", "--overlap", "12", "--batch", "3", "--device", "cpu", "--quiet"]
ARRAYS = ("fine_labels", "fine_confidence", "coarse_prob", "fallback")
VOXEL = (30.0, 4.0, 4.0)
LABEL_MAP = ["--label-map", str(ROOT / "examples" / "label_maps" / "vnc_sstem_sets.yaml")]  # a set among 3 values


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """This process predicts on one torch thread, as each Ray worker: CPU kernels round differently with 2."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray_cluster():
    """One private local Ray for the module: fresh temp folder, never an existing cluster."""
    import ray

    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_ADDRESS", "PYTHONPATH")}
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    os.environ["RAY_TMPDIR"] = tmp
    os.environ.pop("RAY_ADDRESS", None)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), saved["PYTHONPATH"]) if p)  # this checkout
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    import zarr

    work = tmp_path_factory.mktemp("blockwise")
    untrained_checkpoint(work / "model_a", 0)
    untrained_checkpoint(work / "model_b", 1)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 120, SHAPE[2])[None, None, :]  # slices of different brightness: z-score matters
    vol = (rng.integers(0, 120, SHAPE) + ramp + 10 * np.arange(SHAPE[0])[:, None, None]).astype(np.uint8)
    zarr.create_array(store=str(work / "vol.zarr"), data=vol, chunks=(1, 64, 64))
    _ome_image(work / "vol.ome.zarr", vol)
    return work


def _ome_image(path: Path, vol: np.ndarray) -> None:
    """The volume as an OME-Zarr image of two levels, 30 x 4 x 4 nm voxels, written by ome-zarr-py."""
    import zarr
    from ome_zarr.writer import write_image

    write_image(vol, zarr.open_group(str(path), mode="w"), scale_factors=(2,), axes="zyx",
                scale=dict(zip("zyx", VOXEL)), axes_units=dict.fromkeys("zyx", "nanometer"))  # fmt: skip


def _args(work: Path, out: str, *extra: str, model: str = "model_a") -> list[str]:
    return ["--model", str(work / model), "--input", str(work / "vol.zarr"), "--output", str(work / out), *FLAGS,
            *extra]  # fmt: skip


def _blockwise(work: Path, out: str, *extra: str, model: str = "model_a") -> BlockwiseResult:
    return predict_blockwise(parse_args(_args(work, out, "--ray", *extra, model=model)))


@pytest.fixture(scope="module")
def reference(work: Path) -> Path:
    """Whole-volume predict, decoded in a label map's values (so label_values is written too)."""
    assert predict_main(_args(work, "ref.zarr", *LABEL_MAP)) == 0
    return work / "ref.zarr"


@pytest.fixture(scope="module")
def blockwise(work: Path, ray_cluster) -> tuple[Path, BlockwiseResult]:
    """2 workers, over (``--overwrite``) a plain predict's store of the other decoding."""
    assert predict_main(_args(work, "bw.zarr")) == 0
    return work / "bw.zarr", _blockwise(work, "bw.zarr", "--block", BLOCK, "--halo", "12,12", "--overwrite", *LABEL_MAP)


def _assert_same(got: Path, want: Path, names: tuple[str, ...] = (*ARRAYS, "label_values")) -> None:
    """Equal outputs (OME-Zarr's float32 holds the plain store's float16 values, so floats compare as float32)."""
    import zarr

    from hierseg.serve.stackio import zarr_output_arrays

    a, b = (zarr_output_arrays(zarr.open_group(str(p), mode="r")) for p in (got, want))
    for name in names:
        x, y = np.asarray(a[name][...]), np.asarray(b[name][...])
        assert (x.dtype == y.dtype or x.dtype.kind == y.dtype.kind == "f") and x.shape == y.shape, name
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), atol=1e-5, rtol=0, err_msg=name)
        else:
            assert np.array_equal(x, y), f"{name}: {(x != y).sum()} voxels differ"


@pytest.mark.parametrize("block", [(17, 23), (64, 72), (150, 7), (150, 170)])
def test_region_probs_equal_whole_slice(work: Path, block: tuple[int, int]) -> None:
    """Any block of a slice, through its part of the slice only, gets the whole slice's probabilities exactly."""
    from hierseg.serve.infer import PredictOptions, load_predictor, predict_probs, predict_region_probs, region_tiles

    model = load_predictor(str(work / "model_a")).model
    image = torch.from_numpy(np.random.default_rng(1).standard_normal((1, *SHAPE[1:])).astype(np.float32))
    opts = PredictOptions(tile=48, overlap=12, batch=3)  # 20 windows: batches of 3, the last of 2
    whole = predict_probs(model, image, opts)
    (h, w), (bh, bw) = SHAPE[1:], block
    for y0 in range(0, h, bh):
        for x0 in range(0, w, bw):
            interior = (y0, min(y0 + bh, h), x0, min(x0 + bw, w))
            _, (fy0, fy1, fx0, fx1) = region_tiles(h, w, interior, opts)
            assert fy0 <= max(0, y0 - 12) and fy1 >= min(h, interior[1] + 12)  # the overlap, at least, is read
            part = predict_region_probs(model, image[:, fy0:fy1, fx0:fx1], (fy0, fx0), (h, w), interior, opts)
            assert torch.equal(part, whole[:, interior[0] : interior[1], interior[2] : interior[3]]), interior


def test_blockwise_equals_whole_volume_predict(work: Path, reference: Path, blockwise) -> None:
    import zarr

    out, result = blockwise
    assert (result.blocks, result.computed, result.skipped) == (18, 18, 0)
    assert result.voxels == int(np.prod(SHAPE))
    _assert_same(out, reference)
    ref = zarr.open_group(str(reference), mode="r")
    assert len(np.unique(ref["fine_labels"][...])) > 3 and len(np.unique(ref["label_values"][...])) == 3
    root = zarr.open_group(str(out), mode="r")
    assert root["fine_labels"].chunks == (2, 64, 72) and root["coarse_prob"].chunks == (1, 2, 64, 72)
    assert root["label_values"].dtype == np.int32 and np.asarray(root[DONE_ARRAY][...]).all()
    record = root.attrs[RECORD_ATTR]
    assert record["block"] == [2, 64, 72] and record["tile"] == 48 and record["model"] == str(work / "model_a")


def _done_count(store: Path) -> int:
    """Blocks marked done so far (a chunk file of block_done exists only once set)."""
    return sum(1 for p in (store / DONE_ARRAY).rglob("*") if p.is_file() and p.name != "zarr.json")


def test_rerun_predicts_only_unfinished_blocks_and_survives_sigkill(work: Path, reference: Path, blockwise,
                                                                    capsys) -> None:  # fmt: skip
    """A rerun after a stopped run predicts exactly the unmarked blocks; a worker SIGKILLed meanwhile is
    restarted and its block retried; the output is complete and identical."""
    import zarr

    shutil.copytree(blockwise[0], work / "resume.zarr")
    root = zarr.open_group(str(work / "resume.zarr"), mode="r+")
    undone = [(0, 0, 1), (1, 2, 2), (0, 1, 0), (1, 0, 0), (0, 2, 1), (1, 1, 2), (0, 0, 0), (1, 2, 0)]
    for iz, iy, ix in undone:  # as a stopped run leaves them: outputs half written, not marked
        root[DONE_ARRAY][iz, iy, ix] = 0
        root["fine_labels"][2 * iz : 2 * iz + 2, 64 * iy : 64 * iy + 64, 72 * ix : 72 * ix + 72] = 99
    killed: list[int] = []

    def kill_the_worker_mid_run() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            busy = _done_count(work / "resume.zarr") >= 18 - len(undone) + 2
            pids = descendant_pids("ray::BlockWorker.predict_block") if busy else []
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.02)

    killer = threading.Thread(target=kill_the_worker_mid_run, daemon=True)
    killer.start()
    result = _blockwise(work, "resume.zarr", "--block", BLOCK, "--ray-workers", "1", *LABEL_MAP)
    killed.append(0)  # stops the killer if it never fired
    killer.join()
    assert killed[0] != 0, "the worker was not killed mid-run"
    assert (result.computed, result.skipped) == (len(undone), 18 - len(undone))
    _assert_same(work / "resume.zarr", reference)
    assert predict_main(_args(work, "resume.zarr", "--ray", "--block", BLOCK, *LABEL_MAP)) == 0
    assert "all 18 blocks" in capsys.readouterr().out  # all done: no worker is even started


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ray", "--block", BLOCK, "--halo", "8,8"], "--halo 8,8 is smaller than the tile overlap 12"),
        (["--ray", "--block", "4,64,64"], "--block 4,64,64 is larger than the volume 3,150,170 along z"),
        (["--ray", "--block", BLOCK, "--halo", "1,12,12"], "the z halo must be 0"),
        (["--ray", "--block", "2,64"], "--block 2,64: give Z,Y,X"),
        (["--block", BLOCK], "--block, --halo and --track work with --ray only"),
        (["--track"], "--block, --halo and --track work with --ray only"),
        (["--ray", "--block", BLOCK, "--track"], "--track records the run in MLflow: give --tracking-uri"),
        (["--ray"], "--ray needs --block"),
        (["--ray", "--block", BLOCK, "--voxel-size", "4,4"], "--voxel-size is recorded in OME-Zarr outputs only"),
    ],
)
def test_bad_flags_are_one_line_errors(work: Path, extra: list[str], message: str, capsys) -> None:
    assert predict_main(_args(work, "bad.zarr", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not (work / "bad.zarr").exists()


def test_other_model_or_settings_refused(work: Path, reference: Path, blockwise, capsys) -> None:
    out = blockwise[0].name
    for extra, model, what in [([], "model_b", "weights_sha256"), (["--fine-threshold", "0.7"], "model_a",
                                                                    "fine_threshold 0.5 -> 0.7")]:  # fmt: skip
        assert predict_main(_args(work, out, "--ray", "--block", BLOCK, *extra, model=model)) == 2
        err = capsys.readouterr().err.strip()
        assert "was written by another model or settings" in err and what in err and "--overwrite" in err
    assert predict_main(_args(work, "ref.zarr", "--ray", "--block", BLOCK)) == 2  # plain predict's store
    assert "was not written by predict --ray" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ome_blockwise(work: Path, ray_cluster) -> tuple[Path, BlockwiseResult]:
    """1 worker, from the OME-Zarr image into an OME-Zarr store (asked for by the ``.ome.zarr`` suffix)."""
    args = ["--model", str(work / "model_a"), "--input", str(work / "vol.ome.zarr"), "--output",
            str(work / "bw.ome.zarr"), *FLAGS, "--ray", "--block", BLOCK, "--ray-workers", "1", *LABEL_MAP]  # fmt: skip
    return work / "bw.ome.zarr", predict_blockwise(parse_args(args))


def _ome_nodes(path: Path) -> dict[str, object]:
    """The nodes ome-zarr-py's reader finds from ``path``, by their path inside it."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    return {Path(n.zarr.path).relative_to(path).as_posix().strip("."): n for n in Reader(parse_url(str(path)))()}


def test_ome_zarr_output_is_read_back_by_ome_zarr_py(work: Path, reference: Path, ome_blockwise) -> None:
    """NGFF image + labels with the input's voxel size; chunks on the block grid; values as predict's."""
    import zarr

    out, result = ome_blockwise
    assert (result.computed, result.voxel.scale) == (18, VOXEL)
    nodes = _ome_nodes(out)
    assert set(nodes) == {"", "labels", *(f"labels/{n}" for n in ("fine_labels", "fallback", "label_values"))}
    for where, node in nodes.items():
        if where == "labels":
            continue
        assert [a["name"] for a in node.metadata["axes"]] == ["z", "y", "x"], where
        assert {a["unit"] for a in node.metadata["axes"]} == {"nanometer"}, where
        assert node.metadata["coordinateTransformations"] == [[{"type": "scale", "scale": list(VOXEL)}]], where
        assert node.data[0].shape == SHAPE and node.data[0].chunksize == (2, 64, 72), where
    assert {type(s).__name__ for s in nodes["labels/fine_labels"].specs} == {"Label", "Multiscales"}
    coarse = _ome_nodes(out / "coarse_prob")[""]
    assert [a["name"] for a in coarse.metadata["axes"]] == ["c", "z", "y", "x"]
    assert coarse.metadata["coordinateTransformations"] == [[{"type": "scale", "scale": [1.0, *VOXEL]}]]
    props = zarr.open_group(str(out / "labels" / "fallback"), mode="r").attrs["ome"]["image-label"]["properties"]
    assert {"label-value": 255, "class": "undecided"} in props
    _assert_same(out, reference)


def test_ome_zarr_resume_record_and_overwrite(work: Path, ome_blockwise, capsys) -> None:
    """A rerun finds every block done; another voxel size is refused; --overwrite never takes a user's image."""
    out = str(ome_blockwise[0])
    base = ["--model", str(work / "model_a"), "--input", str(work / "vol.ome.zarr"), *FLAGS, "--ray", "--block",
            BLOCK, *LABEL_MAP]  # fmt: skip
    assert predict_main([*base, "--output", out]) == 0
    assert "all 18 blocks" in capsys.readouterr().out
    assert predict_main([*base, "--output", out, "--voxel-size", "40,5,5"]) == 2
    err = capsys.readouterr().err
    assert "was written by another model or settings" in err and "voxel_size" in err
    assert predict_main([*base, "--output", out, "--voxel-size", "4,4"]) == 2
    assert "--voxel-size 4,4: give Z,Y,X in nanometres" in capsys.readouterr().err
    shutil.copytree(work / "vol.ome.zarr", work / "user.ome.zarr")
    assert predict_main([*base, "--output", str(work / "user.ome.zarr"), "--overwrite"]) == 2
    assert "which hierseg did not write" in capsys.readouterr().err and (work / "user.ome.zarr" / "s0").is_dir()


def test_single_process_predict_writes_the_same_ome_zarr(work: Path, ome_blockwise) -> None:
    """``predict`` without --ray: the same OME-Zarr layout, metadata and values (only the chunks differ)."""
    import zarr

    from hierseg.serve.omezarr import PATHS

    args = _args(work, "single.ome.zarr", *LABEL_MAP, "--voxel-size", ",".join(map(str, VOXEL)))
    assert predict_main(args) == 0
    _assert_same(work / "single.ome.zarr", ome_blockwise[0])
    a, b = (zarr.open_group(str(p), mode="r") for p in (work / "single.ome.zarr", ome_blockwise[0]))
    for path in ["labels", *(p.rsplit("/", 1)[0] for p in PATHS.values() if "/" in p)]:
        assert a[path].attrs["ome"] == b[path].attrs["ome"], path
    assert a.attrs["ome"] == b.attrs["ome"]


def test_unknown_model_alias_is_one_line_error(work: Path, capsys) -> None:
    """A real SQLite MLflow registry: an alias the model lacks is refused before any worker starts."""
    import mlflow

    uri = sqlite_store(work / "alias_registry")
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("tiny-seg")
    client.create_model_version("tiny-seg", source=str(work / "model_a"))
    client.set_registered_model_alias("tiny-seg", "champion", "1")
    argv = _args(work, "alias.zarr", "--ray", "--block", BLOCK, "--tracking-uri", uri)
    argv[1] = "models:/tiny-seg@nosuchalias"
    capsys.readouterr()  # MLflow's own lines while the store is created
    assert predict_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no alias 'nosuchalias'" in err and "@champion -> 1" in err
    assert not (work / "alias.zarr").exists()


@pytest.fixture
def mlflow_globals():
    """Restore MLflow's process-wide store URIs: loading a ``runs:/`` model in this process sets them, and a later
    test's ``MlflowClient(uri)`` would then look for registered models in this test's store."""
    import mlflow

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")  # set_*_uri export them for subprocesses
    saved = {k: os.environ.get(k) for k in names}
    yield
    mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])  # None: back to "not set"
    mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.usefixtures("mlflow_globals")
def test_track_records_the_run_beside_the_models_training_run(work: Path, ray_cluster) -> None:
    """``--track``: a FINISHED MLflow run in the model's run's experiment, tagged with that run, holding the
    block counts, the voxels predicted and the store's record; a rerun records its skipped blocks."""
    import json

    import mlflow
    import zarr

    uri = sqlite_store(work / "track_registry")
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("trained", artifact_location=str(work / "track_artifacts"))
    train_run = client.create_run(exp).info.run_id
    client.log_artifacts(train_run, str(work / "model_a"), "model")
    client.set_terminated(train_run)
    argv = _args(work, "tracked.zarr", "--ray", "--block", BLOCK, "--ray-workers", "1", "--tracking-uri", uri,
                 "--track")  # fmt: skip
    argv[1] = f"runs:/{train_run}/model"
    for _ in range(2):
        predict_blockwise(parse_args(argv))
    runs = client.search_runs([exp], "tags.`hierseg.kind` = 'predict'", order_by=["attributes.start_time ASC"])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    first, again = (r.data for r in runs)
    assert first.tags["hierseg.model_run_id"] == train_run and first.tags["hierseg.model"] == argv[1]
    assert first.params["block"] == BLOCK and first.params["ray_workers"] == "1"
    num_blocks = 2 * 3 * 3  # ceil(3/2) x ceil(150/64) x ceil(170/72)
    assert first.metrics["blocks_computed"] == num_blocks and first.metrics["blocks_skipped"] == 0
    assert first.metrics["voxels"] == np.prod(SHAPE)  # every voxel of the volume predicted once
    assert again.metrics["blocks_computed"] == 0 and again.metrics["blocks_skipped"] == num_blocks
    record = json.loads(Path(client.download_artifacts(runs[0].info.run_id, "blockwise.json", str(work))).read_text())
    assert record == dict(zarr.open_group(str(work / "tracked.zarr"), mode="r").attrs[RECORD_ATTR])
