"""Sliding-window, hierarchy-aware prediction of 2D images and 3D stacks (``hierseg predict``).

Why tiles: EM sections are larger than what fits through a U-Net at once, and training saw patches.
Tiles overlap and are blended with a smooth (cosine) window so seams do not show; when the image
fits in one window the result equals a whole-image forward pass (the window divides out).

Why slices are streamed: stacks can be larger than RAM, so slices are read one at a time from TIFF
pages, HDF5/zarr datasets or ``.npy`` memory maps, and written one at a time to the output.

Outputs (per slice, then stacked):

- ``fine_labels`` uint8: fine class 0..11, restricted to the classes of the most probable coarse
  group wherever that group is confident (``>= coarse_threshold``), so fine and coarse agree.
- ``fine_confidence`` float16: softmax probability of the chosen fine class.
- ``coarse_prob`` float16 ``[K, ...]``: sigmoid probability of each group of the first hierarchy level.
- ``fallback`` uint8 (the coarse fallback map): ``0..11`` the fine class (fine confidence
  ``>= fine_threshold``); ``100 + k`` coarse group ``k`` (fine not confident but group ``k`` is);
  ``255`` undecided (neither is confident).
- ``label_values`` int32 (``--decode labels`` only): the winning value of the training label map.

Decoding (``--decode``): ``fine`` takes the fine argmax restricted by confident coarse groups;
``labels`` decides in the label space of the training data: each label-map value (a fine class or a
label set) has the summed softmax of its classes, the most probable value wins, and ``fine_labels``
is the best fine class inside it. So a model trained on a binary mitochondria mask labels
mitochondria exactly where mitochondria beats "anything but mitochondria". ``labels`` is the default
for a model trained with label sets, ``fine`` otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import tempfile
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hierseg.data.normalize import LEGACY, normalize
from hierseg.labels import Hierarchy, LabelSets, LabelSpace

FALLBACK_GROUP_OFFSET = 100
COARSE_CONFIDENT = 0.9
"""A coarse group restricts the fine label only at this probability. Not 0.5: an untrained or unsure
sigmoid head sits near 0.5, and at 0.5 it restricted srf_tem's axon pixels to organelle classes that
data set never labels (held-out axon IoU 0.000 after 40 steps, bench/realdata.py --quick)."""
NO_COARSE = 2.0
"""A threshold no probability reaches: the coarse head never restricts the fine label nor fills the fallback."""
UNDECIDED = 255


def coarse_threshold_for(spec: Any) -> float:
    """The default coarse threshold of a model: none when its first coarse head was not trained.

    With ``loss.lambda_coarse: 0`` that head keeps its random weights on trained features, and its
    sigmoids saturate at random: restricting by it sent srf_tem's held-out myelin pixels to axon (myelin
    IoU 0.905 -> 0.636, bench/README.md).
    """
    return NO_COARSE if spec is not None and spec.lambdas()[0] == 0 else COARSE_CONFIDENT


OUTPUT_NAMES = ("fine_labels", "fine_confidence", "coarse_prob", "fallback")


class PredictError(ValueError):
    """A user error (bad model URI, input, output, option); the message names it and the fix."""


@dataclass
class PredictOptions:
    """Tiling and decision thresholds; defaults suit the quickstart model on CPU."""

    tile: int = 256
    overlap: int = 32
    batch: int = 8
    fine_threshold: float = 0.5
    coarse_threshold: float = COARSE_CONFIDENT
    device: str | None = None  # None: cuda when available, else cpu
    amp: bool = True  # bf16 autocast on GPU (never on CPU)
    decode: str = "fine"  # "fine" or "labels" (see the module doc)
    window: tuple[int, ...] | None = None
    """3D models (validation only): score a ``[D, H, W]`` block in non-overlapping windows of at most this
    ``[z, y, x]`` (:func:`block_windows`); 3D sliding-window prediction is not yet supported."""


# ------------------------------------------------------------------------------------------- tiling
def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Window starts along one axis: every pixel covered, the last window flush with the edge."""
    if size <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, size - tile, stride))
    return [*starts, size - tile]


def blend_window(h: int, w: int, overlap: int) -> torch.Tensor:
    """Cosine ramp over ``overlap`` pixels at each edge, 1 inside; never 0 so every pixel is weighted."""

    def ramp(n: int) -> torch.Tensor:
        r = torch.ones(n)
        m = min(overlap, n // 2)
        if m > 0:
            t = (torch.arange(m, dtype=torch.float32) + 0.5) / m
            edge = 0.5 - 0.5 * torch.cos(math.pi * t)
            r[:m], r[n - m :] = edge, edge.flip(0)
        return r.clamp_min(1e-3)

    return ramp(h)[:, None] * ramp(w)[None, :]


def _device_of(options: PredictOptions) -> torch.device:
    if options.device:
        return torch.device(options.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


Box = tuple[int, int, int, int]
"""``(y0, y1, x0, x1)``, half-open, in pixels of the whole slice."""


def tile_grid(h: int, w: int, options: PredictOptions) -> tuple[int, int, list[tuple[int, int]]]:
    """Window height, width and the ``(y, x)`` starts of every window of an ``h x w`` slice, in the order run."""
    th, tw = min(options.tile, h), min(options.tile, w)
    return th, tw, [(y, x) for y in tile_starts(h, th, options.overlap) for x in tile_starts(w, tw, options.overlap)]


def region_tiles(h: int, w: int, interior: Box, options: PredictOptions) -> tuple[list[int], Box]:
    """The windows of the whole slice's grid that touch ``interior``, and the box they cover (what must be read).

    That box reaches at least ``overlap`` pixels past the interior (the volume's edge permitting) and less than
    ``tile``: a window that ends earlier does not touch the interior.
    """
    th, tw, boxes = tile_grid(h, w, options)
    y0, y1, x0, x1 = interior
    needed = [i for i, (y, x) in enumerate(boxes) if y < y1 and y + th > y0 and x < x1 and x + tw > x0]
    if not needed:
        raise ValueError(f"region {interior} lies outside the {h} x {w} slice")
    ys, xs = [boxes[i][0] for i in needed], [boxes[i][1] for i in needed]
    return needed, (min(ys), max(ys) + th, min(xs), max(xs) + tw)


def _batches(needed: list[int], num_tiles: int, batch: int) -> Iterator[tuple[list[int], int]]:
    """Runs of ``needed`` windows, each run as large as the batch the whole-slice pass puts those windows in.

    Why: CPU kernels round a batch of 1 differently from a batch of 8 (by ~1e-6), while a window's result does
    not depend on which other windows share its batch; so a region padded to the whole slice's batch sizes
    gets bit-identical probabilities. For the whole slice this gives exactly the consecutive batches.
    """
    run: list[int] = []
    size = 0
    for i in needed:
        n = min(batch, num_tiles - (i // batch) * batch)
        if run and (n != size or len(run) == size):
            yield run, size
            run = []
        run.append(i)
        size = n
    if run:
        yield run, size


@torch.no_grad()
def predict_region_probs(
    model: torch.nn.Module,
    image_CHW: torch.Tensor,
    origin: tuple[int, int],
    slice_hw: tuple[int, int],
    interior: Box,
    options: PredictOptions,
) -> torch.Tensor:
    """Blended probabilities of ``interior`` of a slice, exactly as :func:`predict_probs` of the whole slice.

    ``image_CHW`` is the normalised input of a part of the slice holding :func:`region_tiles`' box, its pixel
    ``[0, 0]`` at slice pixel ``origin``. Exact because it runs the whole slice's windows that touch the
    interior, with the same blend window, summed per pixel in the same order, in batches of the same sizes.
    """
    device = next(model.parameters()).device
    th, tw, boxes = tile_grid(*slice_hw, options)
    needed, _ = region_tiles(*slice_hw, interior, options)
    (oy, ox), (_, rh, rw) = origin, image_CHW.shape
    window = blend_window(th, tw, options.overlap if len(boxes) > 1 else 0).to(device)
    acc, weight = None, torch.zeros(rh, rw, device=device)
    ctx = autocast_for(options, device)
    for run, size in _batches(needed, len(boxes), options.batch):
        starts = [(boxes[i][0] - oy, boxes[i][1] - ox) for i in run]
        tiles = [image_CHW[:, y : y + th, x : x + tw] for y, x in starts]
        tiles += tiles[-1:] * (size - len(run))  # pad to the whole-slice batch size; the extra results are dropped
        probs = window_probs(model, torch.stack(tiles).to(device), ctx)
        if acc is None:
            acc = torch.zeros(probs.shape[1], rh, rw, device=device)
        for (y, x), p in zip(starts, probs[: len(run)]):
            acc[:, y : y + th, x : x + tw] += p * window
            weight[y : y + th, x : x + tw] += window
    y0, y1, x0, x1 = interior
    return (acc / weight)[:, y0 - oy : y1 - oy, x0 - ox : x1 - ox].cpu()


def autocast_for(options: PredictOptions, device: torch.device) -> Any:
    """bf16 autocast on GPU when ``options.amp``; a no-op context on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if options.amp and device.type == "cuda" else nullcontext()


def window_probs(model: torch.nn.Module, x_BCS: torch.Tensor, autocast: Any) -> torch.Tensor:
    """``[B, 12 + sum K, *S]`` probabilities of a batch of windows: softmax fine, then every level's sigmoids."""
    with autocast:
        logits_fine, logits_coarse = model(x_BCS)
    return torch.cat([logits_fine.float().softmax(1), *(lc.float().sigmoid() for lc in logits_coarse)], 1)


def block_windows(shape_S: tuple[int, ...], window: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """Non-overlapping near-equal windows of at most ``window`` that cover a block of ``shape_S`` exactly once.

    Why no overlap: validation of a 3D model must score every voxel exactly once, and until 3D sliding
    windows with blending exist, tiling without overlap is the simplest exact scheme (the U-Net pads a
    window whose sides its pooling does not divide, so near-equal sides need no special case).
    """
    from hierseg.data.shards import tile_bounds

    per_axis = [tile_bounds(n, w) for n, w in zip(shape_S, window, strict=True)]
    return [tuple(slice(a, b) for a, b in box) for box in itertools.product(*per_axis)]


def predict_probs(model: torch.nn.Module, image_CHW: torch.Tensor, options: PredictOptions) -> torch.Tensor:
    """Blended ``[12 + sum K, H, W]`` probabilities (softmax fine, then sigmoid coarse of every level) of one image.

    ``image_CHW`` is the normalised network input (:func:`hierseg.data.normalize.normalize`).
    """
    _, h, w = image_CHW.shape
    return predict_region_probs(model, image_CHW, (0, 0), (h, w), (0, h, 0, w), options)


def decide(
    probs: torch.Tensor, lut: torch.Tensor, options: PredictOptions, label_space: LabelSpace | None = None
) -> dict[str, np.ndarray]:
    """Fine labels (by ``options.decode``), confidence, level-0 coarse probabilities and the fallback map."""
    n_fine, k = lut.shape
    fine = probs[:n_fine]
    coarse = probs[n_fine : n_fine + k].to(torch.float16).float()  # decide on the values written out (float16)
    group = coarse.argmax(0)  # first of equal values, as numpy's argmax of the output does
    group_p = coarse.gather(0, group[None])[0]
    confident_group = group_p >= options.coarse_threshold
    extra = {}
    if options.decode == "labels":
        allowed, extra["label_values"] = _label_space_decision(fine, label_space)
    else:
        members = lut.bool().t()[group].movedim(-1, 0)  # [12, *S]: class is in the top group
        allowed = torch.where(confident_group[None], members, torch.ones_like(members))
    conf, label = fine.masked_fill(~allowed, -1.0).max(0)
    conf = conf.to(torch.float16).float()  # thresholds apply to the written (float16) confidence
    fallback = torch.full_like(label, UNDECIDED)
    fallback = torch.where(confident_group, group + FALLBACK_GROUP_OFFSET, fallback)
    fallback = torch.where(conf >= options.fine_threshold, label, fallback)
    return {
        "fine_labels": label.to(torch.uint8).numpy(),
        "fine_confidence": conf.to(torch.float16).numpy(),
        "coarse_prob": coarse.to(torch.float16).numpy(),
        "fallback": fallback.to(torch.uint8).numpy(),
        **extra,
    }


def _label_space_decision(fine_CS: torch.Tensor, space: LabelSpace | None) -> tuple[torch.Tensor, np.ndarray]:
    """The most probable label-map value per pixel (a set's probability: its classes' summed softmax).

    Returns the fine classes allowed where each value won ``[12, *S]`` and the winning values' codes.
    """
    if space is None or not len(space):
        raise PredictError("--decode labels needs the model's training label map; use --decode fine")
    table_VC = space.members_table()
    value_probs = torch.einsum("vc,c...->v...", table_VC.float(), fine_CS)
    win = value_probs.argmax(0)
    codes = torch.tensor([v.code for v in space.values], dtype=torch.int32)
    return table_VC[win].movedim(-1, 0), codes[win].numpy()


def _as_chw(x: np.ndarray, channels: int) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3 or t.shape[0] != channels:
        raise PredictError(f"image of shape {tuple(x.shape)} does not fit a model with {channels} input channel(s)")
    return t


def predict_image(
    model: torch.nn.Module,
    image: np.ndarray,
    tile: int = 256,
    overlap: int = 32,
    batch: int = 8,
    hierarchy: Hierarchy | None = None,
    options: PredictOptions | None = None,
    normalization: dict[str, Any] | None = None,
    label_space: LabelSpace | None = None,
) -> dict[str, np.ndarray]:
    """Predict one raw ``[H, W]`` or ``[C, H, W]`` image (any dtype); returns the outputs (see module doc).

    ``normalization`` is the model's recorded one (default: per-image z-score, the training default).
    """
    opts = options or PredictOptions(tile=tile, overlap=overlap, batch=batch)
    lut = (hierarchy or Hierarchy.default()).lut()
    in_ch = model.stem[0].in_channels if hasattr(model, "stem") else 1
    x = _as_chw(normalize(np.asarray(image), normalization or {"mode": "zscore"}), in_ch)
    probs = predict_probs(model, x, opts)
    return decide(probs, lut, opts, label_space)


@dataclass
class Predictor:
    """A loaded model with everything its predictions depend on: hierarchy, normalisation, label space."""

    model: torch.nn.Module
    hierarchy: Hierarchy = field(default_factory=Hierarchy.default)
    normalization: dict[str, Any] = field(default_factory=lambda: {"mode": "zscore"})
    label_sets: LabelSets = field(default_factory=LabelSets)
    label_space: LabelSpace | None = None
    """The training label map's values (``None`` for a model that does not record its label map)."""
    patch_size: int | list[int] = 256
    """The training patch size: the default prediction window (``[z, y, x]`` for a 3D model)."""
    spec: Any = None
    """The resolved training spec (``None`` for a bare model)."""

    @property
    def default_decode(self) -> str:
        return "labels" if len(self.label_sets) and self.label_space is not None else "fine"

    def predict(self, image: np.ndarray, options: PredictOptions) -> dict[str, np.ndarray]:
        return predict_image(
            self.model, image, hierarchy=self.hierarchy, options=options,
            normalization=self.normalization, label_space=self.label_space,
        )  # fmt: skip

    def decoding_into(self, label_map_path: str) -> Predictor:
        """This model decoding into another label map's values (``--label-map``): a model trained on several
        sources, or on fine labels, scored in the label space of one data set (a binary mask's
        "mitochondria vs the rest")."""
        import dataclasses

        from hierseg.data.labelmap import LabelMap

        try:
            lm = LabelMap.from_yaml(label_map_path)
        except ValueError as e:
            raise PredictError(str(e)) from None
        space = LabelSpace.from_label_map(lm.to_manifest(), lm.sets)
        if not len(space):
            raise PredictError(f"--label-map {label_map_path}: every value maps to uncertain; nothing to decode into")
        return dataclasses.replace(self, label_sets=lm.sets, label_space=space)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Predictor:
        from hierseg.pyfunc import model_from_state

        model, spec = model_from_state(state)
        record = state.get("label_map")
        sets = LabelSets.from_config((record or {}).get("sets") or [], where="checkpoint label_map sets")
        space = LabelSpace.from_label_map(record, sets) if record else None
        norm = state_normalization(state, spec)
        return cls(model, spec.hierarchy.build(), norm, sets, space, spec.data.patch_size, spec)


def state_normalization(state: dict[str, Any], spec: Any) -> dict[str, Any]:
    """The normalisation a checkpoint was trained with; checkpoints from before it was recorded used ``dtype_max``."""
    if state.get("normalization"):
        return dict(state["normalization"])
    if "normalization" not in (state.get("spec", {}).get("data") or {}):
        return dict(LEGACY)
    from hierseg.data.normalize import resolve

    try:
        return resolve(spec.data.normalization, None)
    except ValueError as e:
        raise PredictError(f"the checkpoint does not record its normalisation: {e}") from None


def predict_volume(
    predictor: Predictor,
    volume: Any,
    options: PredictOptions | None = None,
    progress: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Predict a ``[Z, H, W]`` stack slice by slice (any object with ``len`` and ``[z]``): memory stays one slice."""
    from tqdm import tqdm

    opts = options or PredictOptions()
    for z in tqdm(range(len(volume)), desc="predict", unit="slice", disable=not progress):
        yield predictor.predict(np.asarray(volume[z]), opts)


# ------------------------------------------------------------------------------------- model loading
def _download_model(uri: str, tracking_uri: str | None) -> Path:
    """Download a logged/registered hierseg model and return its checkpoint file."""
    import mlflow
    import yaml

    from hierseg.registry import resolve_model_uri

    resolve_model_uri(uri, tracking_uri)  # clear errors for unknown names, versions, aliases
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    dst = Path(tempfile.mkdtemp(prefix="hierseg-model-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except Exception as e:
        raise PredictError(f"--model {uri}: cannot download the model ({type(e).__name__}: {e})") from None
    mlmodel = yaml.safe_load((local / "MLmodel").read_text()) if (local / "MLmodel").is_file() else {}
    arts = mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    rel = arts.get("checkpoint", {}).get("path") if isinstance(arts.get("checkpoint"), dict) else None
    path = local / rel if rel else next(iter(sorted(local.rglob("state.pt"))), None)
    if path is None or not Path(path).is_file():
        raise PredictError(
            f"--model {uri} is not a hierseg model (no 'checkpoint' artifact); log it with hierseg train"
        )
    return Path(path)


def load_predictor(uri: str, tracking_uri: str | None = None) -> Predictor:
    """``models:/NAME@alias``, ``models:/NAME/VERSION``, ``runs:/ID/model`` or a local checkpoint -> Predictor."""
    from hierseg.train.checkpoint import load_state

    if uri.startswith(("models:/", "runs:/")):
        path = _download_model(uri, tracking_uri)
    else:
        path = Path(uri)
        if not path.exists():
            raise PredictError(
                f"--model {uri}: no such checkpoint file or folder; give models:/NAME@alias, models:/NAME/VERSION, "
                "runs:/RUN_ID/model, or a checkpoint folder / state.pt"
            )
    try:
        predictor = Predictor.from_state(load_state(path))
    except (FileNotFoundError, RuntimeError, KeyError) as e:
        raise PredictError(f"--model {uri}: not a loadable hierseg checkpoint ({e})") from None
    except ValueError as e:
        raise PredictError(f"--model {uri}: {e}") from None
    if predictor.spec is not None and predictor.spec.model.dims == 3:
        raise PredictError(
            f"--model {uri} is a 3D model (model.dims 3): 3D prediction (3D sliding windows, OME-Zarr output) is not "
            "yet supported; predict with a 2D model (its best checkpoint stays in the run folder for later)"
        )
    return predictor


def load_model(uri: str, tracking_uri: str | None = None) -> tuple[torch.nn.Module, Any]:
    """The model and resolved spec of :func:`load_predictor`."""
    p = load_predictor(uri, tracking_uri)
    return p.model, p.spec


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="hierseg predict", description="Segment an image or stack with a model.")
    ap.add_argument("--model", required=True, help="models:/NAME@alias | models:/NAME/VERSION | runs:/ID/model | ckpt")
    ap.add_argument("--input", required=True, help="2D image, folder of images, TIFF stack, file.h5:dataset, zarr")
    ap.add_argument("--output", required=True, help="folder (tif/npy per output), out.zarr or out.h5[:group]")
    ap.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI)")
    add_tiling_args(ap)
    ap.add_argument("--fine-threshold", type=float, default=0.5)
    ap.add_argument("--coarse-threshold", type=float, default=None,
                    help=f"a coarse group at or above this restricts the fine label (default {COARSE_CONFIDENT}; "
                         "none for a model trained with lambda_coarse 0)")  # fmt: skip
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    ap.add_argument("--no-amp", action="store_true", help="no bf16 autocast on GPU")
    ap.add_argument("--label-map", default=None,
                    help="decode into this label map's values (with --decode labels, the default then) instead of "
                         "the training one's: e.g. a multi-source model on one source's labels")  # fmt: skip
    ap.add_argument("--overwrite", action="store_true", help="replace hierseg's earlier outputs at --output")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--voxel-size", default=None, metavar="Z,Y,X",
                    help="voxel size in nm recorded in an OME-Zarr output (--output out.ome.zarr); default: the "
                         "input's, when it is an OME-Zarr image")  # fmt: skip
    ray = ap.add_argument_group("blockwise on Ray (hierseg.blockwise): resumable, into out.zarr")
    ray.add_argument("--ray", action="store_true", help="predict blocks on Ray workers ($RAY_ADDRESS, else local)")
    ray.add_argument("--block", default=None, metavar="Z,Y,X", help="block shape (and the output's chunks)")
    ray.add_argument("--halo", default=None, metavar="Y,X", help="context past each block (or 0,Y,X); at least "
                     "--overlap, the default")  # fmt: skip
    ray.add_argument("--ray-workers", type=int, default=2, metavar="N", help="Ray actors, each loading the model once")
    return ap.parse_args(argv)


def add_tiling_args(ap: argparse.ArgumentParser) -> None:
    """Flags shared by predict and evaluate, so both score through the same windows and decoding."""
    ap.add_argument("--tile", type=int, default=None, help="window side (default: the model's training patch size)")
    ap.add_argument("--overlap", type=int, default=None, help="window overlap (default: tile / 8)")
    ap.add_argument("--batch", type=int, default=8, help="tiles per forward pass")
    ap.add_argument("--decode", choices=["fine", "labels"], default=None,
                    help="fine: 12-way argmax; labels: in the training label map's values "
                         "(default: labels for a model trained with label sets)")  # fmt: skip


def default_options(predictor: Predictor, **overrides: Any) -> PredictOptions:
    """Windows of the training patch size with 1/8 overlap and the model's default decoding (as validation)."""
    tile = overrides.pop("tile", None) or predictor.patch_size
    overlap = overrides.pop("overlap", None)
    decode = overrides.pop("decode", None) or predictor.default_decode
    if overrides.get("coarse_threshold") is None:
        overrides["coarse_threshold"] = coarse_threshold_for(predictor.spec)
    opts = PredictOptions(tile=tile, overlap=tile // 8 if overlap is None else overlap, decode=decode, **overrides)
    if opts.tile < 16 or not 0 <= opts.overlap < opts.tile or opts.batch < 1:
        raise PredictError("--tile must be >= 16, --overlap in [0, tile), --batch >= 1")
    if not 0.0 <= opts.fine_threshold <= 1.0:
        raise PredictError("--fine-threshold must be in [0, 1]")
    if not (0.0 <= opts.coarse_threshold <= 1.0 or opts.coarse_threshold == NO_COARSE):
        raise PredictError("--coarse-threshold must be in [0, 1]")
    return opts


def main(argv: list[str] | None = None) -> int:
    from hierseg.omezarr import output_voxel_size, voxel_note
    from hierseg.registry import RegistryError
    from hierseg.stackio import StackError, check_not_input, open_input, open_output

    args = parse_args(argv)
    if args.ray or args.block or args.halo:
        from hierseg.blockwise import main_blockwise

        return main_blockwise(args)
    try:
        check_not_input(args.output, args.input)
        source = open_input(args.input)
        voxel = output_voxel_size(args.voxel_size, source.voxel_size, args.output)
        predictor = load_predictor(args.model, args.tracking_uri)
        if args.label_map:
            predictor = predictor.decoding_into(args.label_map)
        opts = default_options(
            predictor, tile=args.tile, overlap=args.overlap, batch=args.batch,
            decode=args.decode or ("labels" if args.label_map else None),
            fine_threshold=args.fine_threshold, coarse_threshold=args.coarse_threshold, device=args.device,
            amp=not args.no_amp,
        )  # fmt: skip
        predictor.model = predictor.model.to(_device_of(opts))
        k, group_names = predictor.hierarchy.num_groups[0], tuple(predictor.hierarchy.levels[0].group_names)
        labels = opts.decode == "labels"
        with open_output(args.output, source.shape, k, overwrite=args.overwrite, is_2d=source.is_2d,
                         label_values=labels, voxel=voxel, group_names=group_names) as sink:  # fmt: skip
            for z, out in enumerate(predict_volume(predictor, source, opts, progress=not args.quiet)):
                sink.write(z, out)
    except (PredictError, RegistryError, StackError, ConnectionError) as e:
        print(f"hierseg predict: {e}", file=sys.stderr)
        return 2
    names = [*OUTPUT_NAMES, "label_values"] if labels else OUTPUT_NAMES
    groups = ", ".join(f"{FALLBACK_GROUP_OFFSET + i}={g}" for i, g in enumerate(group_names))
    print(f"hierseg predict: wrote {', '.join(names)} to {args.output} (decode {opts.decode}; fallback: 0..11 fine, "
          f"{groups}, {UNDECIDED}=undecided){voxel_note(args.output, voxel)}")  # fmt: skip
    return 0
