"""Sliding-window inference and evaluation: tiling equals whole-image prediction, outputs are
consistent with the hierarchy, every input/output format round-trips, errors exit 2.

Models come from two tiny real training runs registered through ``hierseg promote``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hierseg.labels import Hierarchy
from hierseg.serve.infer import FALLBACK_GROUP_OFFSET, UNDECIDED, PredictOptions, predict_image, predict_probs
from tests.registry_helpers import promote_champion, trained

pytestmark = pytest.mark.timeout(300)
VNC = Path(__file__).resolve().parents[2] / "shared" / "data" / "vnc_sstem"


@pytest.fixture(scope="module")
def model():
    from hierseg.serve.pyfunc import model_from_checkpoint

    return model_from_checkpoint(trained().checkpoints[0])[0]


def _check_outputs(out: dict[str, np.ndarray], shape: tuple[int, ...], opts: PredictOptions) -> None:
    """Shapes, dtypes, ranges and hierarchy consistency of one prediction."""
    lut = Hierarchy.default().lut().bool().numpy()
    k = lut.shape[1]
    assert out["fine_labels"].shape == shape and out["fine_labels"].dtype == np.uint8
    assert out["fine_confidence"].shape == shape and out["fine_confidence"].dtype == np.float16
    assert out["coarse_prob"].shape == (k, *shape) and out["coarse_prob"].dtype == np.float16
    assert out["fallback"].shape == shape and out["fallback"].dtype == np.uint8
    assert out["fine_labels"].max() <= 11
    conf, prob = out["fine_confidence"].astype(np.float32), out["coarse_prob"].astype(np.float32)
    assert conf.min() >= 0 and conf.max() <= 1 and prob.min() >= 0 and prob.max() <= 1
    top, top_p = prob.argmax(0), prob.max(0)
    sure = top_p >= opts.coarse_threshold
    assert lut[out["fine_labels"][sure], top[sure]].all(), "fine class outside the confident coarse group"
    fb = out["fallback"]
    fine_ok = conf >= opts.fine_threshold
    assert np.array_equal(fb[fine_ok], out["fine_labels"][fine_ok])
    assert np.array_equal(fb[~fine_ok & sure], top[~fine_ok & sure] + FALLBACK_GROUP_OFFSET)
    assert (fb[~fine_ok & ~sure] == UNDECIDED).all()


def test_tiled_equals_whole_image_when_it_fits(model) -> None:
    img = np.random.default_rng(0).integers(0, 256, (90, 77), dtype=np.uint8)
    x = torch.from_numpy(img.astype(np.float32) / 255)[None, None]
    with torch.no_grad():
        lf, lc = model(x)
    whole = torch.cat([lf.softmax(1), lc[0].sigmoid()], 1)[0]
    tiled = predict_probs(model, x[0], PredictOptions(tile=128, overlap=32, batch=4))
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)
    out = predict_image(model, img, tile=128, overlap=32, batch=4, normalization={"mode": "affine", "lo": 0, "hi": 255})
    np.testing.assert_allclose(out["coarse_prob"].astype(np.float32), lc[0][0].sigmoid().numpy(), atol=1e-3)


def test_multi_tile_blending_is_close_to_whole(model) -> None:
    img = np.random.default_rng(1).integers(0, 256, (100, 130), dtype=np.uint8)
    whole = predict_probs(model, torch.from_numpy(img / 255.0).float()[None], PredictOptions(tile=256))
    tiled = predict_probs(model, torch.from_numpy(img / 255.0).float()[None], PredictOptions(tile=48, overlap=16))
    assert torch.isfinite(tiled).all() and tiled.shape == whole.shape
    assert (tiled[:12].argmax(0) == whole[:12].argmax(0)).float().mean() > 0.8


def test_synthetic_stack_outputs_consistent() -> None:
    from hierseg.data.synth import synth_stack
    from hierseg.serve.infer import load_predictor, predict_volume

    vol = np.asarray(synth_stack(seed=0, depth=3, size=96)[0])
    opts = PredictOptions(tile=64, overlap=16, batch=4, fine_threshold=0.6, coarse_threshold=0.4)
    outs = list(predict_volume(load_predictor(str(trained().checkpoints[0])), vol, options=opts))
    assert len(outs) == 3
    for out in outs:
        _check_outputs(out, vol.shape[1:], opts)


def _views_by_hand(model: torch.nn.Module, x_CS: np.ndarray) -> np.ndarray:
    """Mean over the 8 turns/mirror images of the y-x plane of the model's probabilities, each turned back."""
    total = 0
    for turns in range(4):
        for mirror in (False, True):
            view = np.rot90(x_CS, turns, axes=(-2, -1))
            view = view[..., ::-1] if mirror else view
            with torch.no_grad():
                lf, lc = model(torch.from_numpy(view.copy())[None])
            probs = torch.cat([lf.softmax(1), *(c.sigmoid() for c in lc)], 1)[0].numpy()
            probs = probs[..., ::-1] if mirror else probs
            total = total + np.rot90(probs, -turns, axes=(-2, -1))
    return total / 8


@pytest.mark.parametrize("dims", [2, 3])
def test_tta_is_the_mean_of_the_eight_plane_views_turned_back(model, dims) -> None:
    """--tta: probabilities = the mean over the 8 symmetries of the y-x plane (numpy by hand), 2D and 3D windows."""
    from hierseg.model import build_model
    from hierseg.spec import ModelSpec

    rng = np.random.default_rng(7)
    if dims == 3:  # a non-square window in y-x, so a quarter turn transposes it
        torch.manual_seed(0)
        net = build_model(ModelSpec(dims=3, depth=2, base_channels=4, voxel_size=[40.0, 10.0, 10.0]),
                          Hierarchy.default()).eval()  # fmt: skip
        x_CS, opts = rng.random((1, 4, 24, 40), dtype=np.float32), dict(tile=(4, 24, 40), overlap=(0, 0, 0))
    else:
        net, x_CS, opts = model, rng.random((1, 40, 56), dtype=np.float32), dict(tile=64, overlap=16)
    want = _views_by_hand(net, x_CS)
    got = predict_probs(net, torch.from_numpy(x_CS), PredictOptions(batch=2, tta=True, **opts)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    plain = predict_probs(net, torch.from_numpy(x_CS), PredictOptions(batch=2, **opts)).numpy()
    assert np.abs(plain - want).max() > 1e-4  # the model is not symmetric: the views do change the result


def _predict(*args: str) -> int:
    from hierseg.serve.infer import main

    return main(["--tracking-uri", trained().uri, "--quiet", *args])


@pytest.mark.realdata
def test_predict_real_stack_through_alias(tmp_path: Path) -> None:
    if not (VNC / "raw" / "00.tif").is_file():
        pytest.skip(f"real data absent: {VNC} (see ../shared/data/README.md)")
    import tifffile
    import zarr

    stack = np.stack([tifffile.imread(VNC / "raw" / f"{i:02d}.tif")[:160, :200] for i in range(2)])
    tifffile.imwrite(tmp_path / "vnc.tif", stack)
    uri = promote_champion()
    assert _predict("--model", uri, "--input", str(tmp_path / "vnc.tif"), "--output", str(tmp_path / "o.zarr"),
                    "--tile", "96", "--overlap", "16") == 0  # fmt: skip
    root = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")
    assert root["fine_labels"].shape == (2, 160, 200) and root["coarse_prob"].shape == (5, 2, 160, 200)
    for z in range(2):
        out = {n: np.asarray(root[n][z]) for n in ("fine_labels", "fine_confidence", "fallback")}
        out["coarse_prob"] = np.asarray(root["coarse_prob"][:, z])
        _check_outputs(out, (160, 200), PredictOptions())


def test_predict_formats_roundtrip(tmp_path: Path) -> None:
    import h5py
    import tifffile
    from PIL import Image

    vol = np.random.default_rng(2).integers(0, 256, (2, 40, 52), dtype=np.uint8)
    with h5py.File(tmp_path / "in.h5", "w") as f:
        f["raw"] = vol
    Image.fromarray(vol[0]).save(tmp_path / "one.png")
    ckpt = str(trained().checkpoints[1])
    assert _predict("--model", ckpt, "--input", f"{tmp_path}/in.h5:raw", "--output", f"{tmp_path}/o.h5:pred") == 0
    with h5py.File(tmp_path / "o.h5") as f:
        assert f["pred/coarse_prob"].shape == (5, 2, 40, 52) and f["pred/fallback"].dtype == np.uint8
        h5_labels = f["pred/fine_labels"][0]
    assert _predict("--model", ckpt, "--input", str(tmp_path / "one.png"), "--output", str(tmp_path / "d")) == 0
    assert tifffile.imread(tmp_path / "d" / "fine_labels.tif").shape == (40, 52)
    assert np.array_equal(tifffile.imread(tmp_path / "d" / "fine_labels.tif"), h5_labels)
    assert np.load(tmp_path / "d" / "coarse_prob.npy").shape == (5, 40, 52)
    # --tta reaches the windows: the CLI writes what the 8-view options give for the same image
    from hierseg.serve.infer import default_options, load_predictor

    assert _predict("--model", ckpt, "--input", str(tmp_path / "one.png"), "--output", str(tmp_path / "t"),
                    "--tta") == 0  # fmt: skip
    predictor = load_predictor(ckpt)
    want = predictor.predict(vol[0], default_options(predictor, tta=True))["coarse_prob"]
    np.testing.assert_array_equal(np.load(tmp_path / "t" / "coarse_prob.npy"), want)
    assert not np.array_equal(want, np.load(tmp_path / "d" / "coarse_prob.npy"))


def test_predict_errors_exit_2(tmp_path: Path, capsys) -> None:
    ckpt = str(trained().checkpoints[0])
    assert _predict("--model", ckpt, "--input", str(tmp_path / "missing.tif"), "--output", str(tmp_path / "o")) == 2
    assert "missing.tif does not exist" in capsys.readouterr().err
    np.save(tmp_path / "x.npy", np.zeros((2, 32, 32), np.uint8))
    assert _predict("--model", str(tmp_path / "nockpt"), "--input", str(tmp_path / "x.npy"), "--output",
                    str(tmp_path / "o")) == 2  # fmt: skip
    assert "no such checkpoint" in capsys.readouterr().err
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("user data")
    args = ["--model", ckpt, "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "o")]
    assert _predict(*args) == 0 and (tmp_path / "o" / "keep.txt").read_text() == "user data"
    assert _predict(*args) == 2 and "--overwrite" in capsys.readouterr().err
    assert _predict(*args, "--overwrite") == 0 and (tmp_path / "o" / "keep.txt").read_text() == "user data"
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "coarse_prob.npy", "fallback.tif", "fine_confidence.tif", "fine_labels.tif", "keep.txt"
    ]  # fmt: skip
    for out in (tmp_path / "x.npy", tmp_path):  # the input itself, or a folder holding it: refused
        assert _predict("--model", ckpt, "--input", str(tmp_path / "x.npy"), "--output", str(out), "--overwrite") == 2
        assert "overlaps --input" in capsys.readouterr().err and (tmp_path / "x.npy").is_file()
    promote_champion()  # the registered model whose aliases the message lists (also when this test runs alone)
    assert _predict("--model", "models:/tiny-seg@nope", "--input", str(tmp_path / "x.npy"), "--output",
                    str(tmp_path / "p")) == 2  # fmt: skip
    assert "aliases:" in capsys.readouterr().err


def test_evaluate_shards_matches_training_validation(capsys) -> None:
    from mlflow.tracking import MlflowClient

    from hierseg.serve.evaluate import main

    t = trained()
    capsys.readouterr()  # run alone, this test trains the shared model first: its progress is not the report
    assert main(["--model", f"runs:/{t.run_ids[0]}/model", "--tracking-uri", t.uri, "--shards",
                 str(t.shards_val), "--format", "json"]) == 0  # fmt: skip
    rep = json.loads(capsys.readouterr().out)
    from hierseg.train.checkpoint import load_state

    best = load_state(t.checkpoints[0])["best_metrics"]
    assert rep["num_valid"] == best["val/num_valid"]
    assert rep["fine"]["miou"] == pytest.approx(best["val/fine/miou"], abs=1e-9)  # one code path, same numbers
    assert rep["label"]["miou"] == pytest.approx(best["val/label/miou"], abs=1e-9)
    assert MlflowClient(t.uri).get_run(t.run_ids[0]).data.metrics["val/num_valid"] == rep["num_valid"]


@pytest.mark.realdata
def test_evaluate_labelled_volume_table(tmp_path: Path, capsys) -> None:
    if not (VNC / "labels").is_dir():
        pytest.skip(f"real data absent: {VNC} (see ../shared/data/README.md)")
    import tifffile
    from PIL import Image

    from hierseg.serve.evaluate import main

    raw = np.stack([tifffile.imread(VNC / "raw" / f"{i:02d}.tif")[:96, :96] for i in range(2)])
    lab = np.stack([np.asarray(Image.open(VNC / "labels" / f"labels000000{i:02d}.png"))[:96, :96] for i in range(2)])
    np.save(tmp_path / "raw.npy", raw)
    np.save(tmp_path / "lab.npy", lab)
    (tmp_path / "map.yaml").write_text("mapping: {191: mitochondria, 159: extracellular space}\nunmapped: uncertain\n")
    args = ["--model", str(trained().checkpoints[0]), "--image", str(tmp_path / "raw.npy"),
            "--labels", str(tmp_path / "lab.npy"), "--label-map", str(tmp_path / "map.yaml")]  # fmt: skip
    assert main([*args, "--format", "json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["num_valid"] == int(np.isin(lab, [159, 191]).sum())
    assert rep["fine"]["classes"]["soma"].get("note") == "no data" or rep["fine"]["classes"]["soma"]["pixels"] == 0
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "mitochondria" in table and "coarse group" in table


def test_a_model_trained_without_coarse_term_is_not_restricted_by_its_random_coarse_head(model) -> None:
    """lambda_coarse 0: default decoding is the plain 12-way argmax and the fallback holds no group."""
    from hierseg.serve.infer import COARSE_CONFIDENT, NO_COARSE, Predictor, default_options
    from hierseg.spec import validate_spec
    from tests.train_utils import tiny_spec

    def predictor(lam: float) -> Predictor:
        spec = validate_spec(tiny_spec(Path("s"), Path("w"), loss={"lambda_coarse": lam}))
        return Predictor(model, Hierarchy.default(), {"mode": "zscore"}, patch_size=64, spec=spec)

    assert default_options(predictor(0.2)).coarse_threshold == COARSE_CONFIDENT
    opts = default_options(predictor(0.0))
    assert opts.coarse_threshold == NO_COARSE
    saved = model.coarse_heads[0].weight.detach().clone()
    try:
        with torch.no_grad():  # saturated at random, as an untrained head on trained features is
            model.coarse_heads[0].weight.mul_(50.0)
        img = np.random.default_rng(3).integers(0, 256, (70, 90), dtype=np.uint8)
        out = predictor(0.0).predict(img, opts)
        x = torch.from_numpy((img - img.mean()) / img.std()).float()[None]
        plain = predict_probs(model, x, opts)[:12].argmax(0).numpy()
    finally:
        with torch.no_grad():
            model.coarse_heads[0].weight.copy_(saved)
    assert np.array_equal(out["fine_labels"], plain)
    assert (out["fallback"] < FALLBACK_GROUP_OFFSET).sum() + (out["fallback"] == UNDECIDED).sum() == img.size


def test_a_25d_model_predicts_each_slice_from_its_clamped_neighbours(tmp_path: Path) -> None:
    """2.5D (in_channels 3): slice z is predicted from slices z-1, z, z+1 as channels, clamped at the stack's ends."""
    from hierseg.serve.infer import load_predictor, predict_volume
    from tests.train_utils import untrained_checkpoint

    predictor = load_predictor(str(untrained_checkpoint(tmp_path / "m25", 0, in_channels=3)))
    opts = PredictOptions(tile=64, overlap=16, batch=4)
    vol = np.random.default_rng(0).integers(0, 255, size=(4, 80, 72), dtype=np.uint8)
    outs = list(predict_volume(predictor, vol, opts))
    by_hand = [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]  # the shard builder's edge clamping, written out
    for z, zs in enumerate(by_hand):
        expected = predictor.predict(vol[zs], opts)
        for name, value in expected.items():
            np.testing.assert_array_equal(outs[z][name], value, err_msg=f"slice {z} {name}")
    flat = load_predictor(str(untrained_checkpoint(tmp_path / "m2", 0)))
    assert len(list(predict_volume(flat, vol, opts))) == 4  # a 1-channel model still reads single slices
