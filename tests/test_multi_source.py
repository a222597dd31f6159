"""Several data sets in one run: spec, merged label-set table, mixed stream, per-source metrics, 2 gloo ranks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hierseg.data import shards
from hierseg.data.loader import MixedTrainStream, TrainStream, build_train_loader, build_val_loader
from hierseg.data.sources import resolve_sources
from hierseg.labels import FINE_CLASSES, LabelSets
from hierseg.spec import SpecError, validate_spec
from tests.data_helpers import write_pairs
from tests.dist_utils import run_ranks
from tests.train_utils import TRAIN, mlflow_runs, tiny_spec, write_spec

NORM = {"mode": "zscore"}
NOT_MITO = {"not": ["mitochondria"]}
MAPS = {
    # srf_tem-like: axon and myelin traced, everything else uncertain
    "srf": {"mapping": {3: "axon", 6: "myelin", 255: "uncertain"}, "unmapped": "uncertain"},
    # a binary mitochondria mask: every other value is "anything but mitochondria"
    "mito": {"mapping": {10: "mitochondria", 255: "uncertain", **{v: NOT_MITO for v in range(12) if v != 10}}},
    # vnc_sstem-like sets, so that the mito source's set id 12 has to move in the merged table
    "vnc": {
        "mapping": {5: ["glia", "extracellular space"], 2: "neuron_part", 10: "mitochondria", 255: "uncertain"},
        "unmapped": "uncertain",
    },
}


def _build(root: Path, name: str, seed: int, *extra: str) -> Path:
    src = root / f"{name}_raw"
    write_pairs(src, 6, size=64, seed=seed)
    (root / f"{name}.yaml").write_text(json.dumps(MAPS[name]))  # JSON is YAML
    out = root / name
    args = ["--images", str(src / "images"), "--labels", str(src / "labels"), "--out", str(out)]
    assert shards.main([*args, "--label-map", str(root / f"{name}.yaml"), "--val-frac", "0.34", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multi")
    for seed, name in enumerate(("srf", "mito", "vnc"), start=1):
        _build(root, name, seed)
    return root


def _manifest(root: Path, name: str, split: str) -> dict:
    return json.loads((root / name / split / "manifest.json").read_text())


def _sources(root: Path, *names: str, weights: tuple[float, ...] = ()) -> dict:
    w = weights or (1.0,) * len(names)
    train = [{"name": n, "shards": str(root / n / "train"), "weight": x} for n, x in zip(names, w)]
    val = [{"name": n, "shards": str(root / n / "val")} for n in names]
    return {"train": train, "val": val}


def _data_spec(root: Path, *names: str, **data):
    raw = tiny_spec(root, root, data={**_sources(root, *names), "synthetic": None, **data})
    raw["data"].pop("synthetic")
    return validate_spec(raw)


# ---------------------------------------------------------------------------------------------- spec
def _src(name: str = "a", **kw) -> dict:
    return {"name": name, "shards": "x", **kw}


@pytest.mark.parametrize(
    "train, val, match",
    [
        ([_src(weight=0)], [_src()], r"data\.train\.0\.weight: Input should be greater than 0 \(got 0\)"),
        ([_src(weight=-1)], [_src()], r"data\.train\.0\.weight: Input should be greater than 0 \(got -1\)"),
        ([_src(wieght=2)], [_src()], r"data\.train\.0\.wieght: unknown field; did you mean weight"),
        ([_src()], [_src(weight=1)], r"data\.val\.0\.weight: unknown field; allowed keys: name, shards"),
        ([_src(), _src()], [_src()], r"data\.train: source name 'a' is used twice"),
        ([_src()], "y", r"data: data\.train and data\.val must take the same form"),
        ([_src()], [_src("b")], r"data\.val source 'b' is not a data\.train source"),
        ([_src("a/b")], [_src("a/b")], r"data\.train\.0\.name: 'a/b': a source name holds"),
        ([_src("label")], [_src("label")], r"source name 'label' is reserved"),
        ([_src("coarse")], [_src("coarse")], r"has the name of a hierarchy level"),
        ([{"shards": "x"}], [_src()], r"data\.train\.0\.name: required field is missing"),
        (_src(), "y", r"data\.train: must be a shard location \(a string\) or a list of sources"),
        ([], [], r"data\.train: the list of sources is empty"),
    ],
)
def test_source_spec_errors_name_the_field(train, val, match) -> None:
    raw = {"data": {"train": train, "val": val, "batch_size": 2}, "run": {"max_steps": 1, "num_workers": 1}}
    with pytest.raises(SpecError, match=match):
        validate_spec(raw)


def test_sources_spec_defaults_and_single_string(data) -> None:
    """A missing val source is allowed; weight defaults to 1; one string is the single source 'default'."""
    spec = _data_spec(data, "srf", "mito")
    assert [(s.name, s.weight) for s in spec.data.sources("train")] == [("srf", 1.0), ("mito", 1.0)]
    raw = spec.model_dump(mode="json")
    raw["data"]["val"] = raw["data"]["val"][:1]
    del raw["data"]["train"][1]["weight"]
    again = validate_spec(raw)
    assert again.data.multi_source and [s.name for s in again.data.sources("val")] == ["srf"]
    assert resolve_sources(again.data).val_sources[0].name == "srf"
    one = validate_spec(tiny_spec(data / "srf", data))
    assert not one.data.multi_source and one.data.sources("train")[0].name == "default"


# ------------------------------------------------------------------------------------- merged table
def test_merged_table_remaps_each_source(data) -> None:
    """vnc's two sets keep ids 12, 13; mito's own id 12 (not mitochondria) becomes 14 when decoded."""
    spec = _data_spec(data, "vnc", "mito", "srf")
    sources = resolve_sources(spec.data)
    assert sources.label_sets.names == ("glia_or_extracellular_space", "neuron_part", "not_mitochondria")
    vnc, mito, srf = sources.sources
    assert mito.sets.names == ("not_mitochondria",) and mito.remap.tolist() == [-1, *range(12), 14]
    assert vnc.remap.tolist() == [-1, *range(14)] and srf.remap.tolist() == [-1, *range(12)]
    assert [v.name for v in mito.label_space().values] == ["mitochondria", "not_mitochondria"]
    assert [v.stored_id for v in mito.label_space().values] == [10, 14]
    val = build_val_loader(spec.data, rank=0, world_size=1, normalization=NORM, num_labels=15, sources=sources)
    seen = {k: [] for k in range(3)}
    for _, label, k in val:
        seen[k].append(label)
    for k, (src, name) in enumerate(zip(sources.sources, ("vnc", "mito", "srf"))):
        labels = torch.cat([y.reshape(-1) for y in seen[k]])
        manifest = _manifest(data, name, "val")
        assert len(seen[k]) == manifest["num_samples"]  # every slice exactly once
        assert (
            torch.bincount(labels[(labels >= 0) & (labels < 12)], minlength=12).tolist() == manifest["class_histogram"]
        )
        allowed = {-1, *(int(src.remap[1 + c]) for c in range(src.num_labels))}
        assert set(labels.unique().tolist()) <= allowed
    assert set(torch.cat([y.reshape(-1) for y in seen[1]]).unique().tolist()) == {-1, 10, 14}


def test_explicit_label_sets_order_the_table_and_must_cover_every_source(data) -> None:
    table = [
        {"name": "not_mitochondria", "classes": [c for c in FINE_CLASSES if c != "mitochondria"]},
        {"name": "glia_or_extracellular_space", "classes": ["glia", "extracellular space"]},
        {"name": "neuron_part", "classes": ["dendrite", "axon", "soma"]},
    ]
    sources = resolve_sources(_data_spec(data, "vnc", "mito", label_sets=table).data)
    assert sources.label_sets.names == tuple(t["name"] for t in table)
    assert sources.sources[0].remap[13:].tolist() == [13, 14] and sources.sources[1].remap[13] == 12
    with pytest.raises(ValueError, match=r"data source 'vnc': its manifest's label set 'neuron_part' .* is not in "):
        resolve_sources(_data_spec(data, "vnc", "mito", label_sets=table[:2]).data)


def _copy_with(data: Path, name: str, new: str, edit) -> None:
    """A copy of a source's shards whose manifests are changed by ``edit(manifest, split)``."""
    shutil.rmtree(data / new, ignore_errors=True)
    shutil.copytree(data / name, data / new)
    for split in ("train", "val"):
        path = data / new / split / "manifest.json"
        m = json.loads(path.read_text())
        edit(m, split)
        path.write_text(json.dumps(m))


def test_bad_sources_are_clear_errors_naming_the_source(data) -> None:
    """Disagreeing set tables, a set id table that does not fit, and a source without one valid pixel."""

    def blank(m, _split):  # the shard builder refuses such a split; a hand-made or foreign manifest need not
        m["class_histogram"] = [0] * 12
        m["set_histogram"] = [0] * len(m["label_sets"])

    _copy_with(data, "mito", "blank", blank)
    with pytest.raises(ValueError, match=r"data source 'blank' training manifest: no valid pixel"):
        resolve_sources(_data_spec(data, "srf", "blank").data)

    def rename(m, _split):  # the mito set's name now means {glia, extracellular space} in vnc's terms
        m["label_sets"][0]["name"] = "glia_or_extracellular_space"

    _copy_with(data, "mito", "mito_renamed", rename)
    with pytest.raises(ValueError, match=r"data source 'mito_renamed': .*'glia_or_extracellular_space' is .* but "
                                         r"data source 'vnc' names"):  # fmt: skip
        resolve_sources(_data_spec(data, "vnc", "mito_renamed").data)

    def split_differs(m, split):
        if split == "val":
            m["label_sets"] = []
            m["set_histogram"] = []

    _copy_with(data, "mito", "mito_split", split_differs)
    with pytest.raises(ValueError, match=r"data source 'mito_split': its training and validation manifests"):
        resolve_sources(_data_spec(data, "srf", "mito_split").data)

    def short_histogram(m, _split):
        m["set_histogram"] = []

    _copy_with(data, "mito", "mito_hist", short_histogram)
    with pytest.raises(ValueError, match=r"data source 'mito_hist' training manifest: set_histogram has 0 entries"):
        resolve_sources(_data_spec(data, "srf", "mito_hist").data)


# ---------------------------------------------------------------------------------------- the stream
def _source_of(label: torch.Tensor) -> str:
    values = set(label.unique().tolist()) - {-1}
    return "srf" if values <= {3, 6} else "mito" if values <= {10, 12} else "?"


def test_mixed_stream_draws_by_weight_and_resumes_exactly(data) -> None:
    """Weights 3:1, each sample tagged with its source; a stream stopped after 3 batches and restored continues
    bit-identically; 2 ranks never run dry."""
    spec = _data_spec(data, "srf", "mito", num_workers=2, shuffle_buffer=4, patch_size=32)
    spec.data.train[0].weight = 3.0
    sources = resolve_sources(spec.data)
    kw = {"world_size": 2, "batch_size": 4, "seed": 5, "normalization": NORM, "num_labels": 13, "sources": sources}
    full = build_train_loader(spec.data, rank=0, **kw)
    assert isinstance(full, MixedTrainStream)
    it = iter(full)
    want = [next(it) for _ in range(8)]
    drawn = [_source_of(y) for _, y, _ in want for y in y]
    tagged = [["srf", "mito"][k] for _, _, k_B in want for k in k_B.tolist()]
    assert tagged == drawn and "?" not in drawn and 0.55 < drawn.count("srf") / len(drawn) < 0.95 and "mito" in drawn
    part = build_train_loader(spec.data, rank=0, **kw)
    it = iter(part)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(part.state_dict()))  # plain data, as checkpoints store it
    assert state["sources"] == ["srf", "mito"] and len(state["positions"][0][2]) == 2
    resumed = build_train_loader(spec.data, rank=0, **kw)
    resumed.load_state_dict(state)
    it = iter(resumed)
    for x_want, y_want, k_want in want[3:]:
        x, y, k = next(it)
        assert torch.equal(x, x_want) and torch.equal(y, y_want) and torch.equal(k, k_want)
    other = iter(build_train_loader(spec.data, rank=1, **kw))
    batches = [next(other) for _ in range(8)]  # more samples than rank 1's share of either source's shards
    assert not torch.equal(batches[0][0], want[0][0])
    srf_epochs = [pos[0][0] for _, _, pos in full.state_dict()["positions"]]
    assert min(srf_epochs) >= 1  # the 3x source has cycled its shards: sources never end


# --------------------------------------------------------------------------------------- 2 gloo ranks
def _rank_job(rank: int, world: int, raw: dict):
    from hierseg.spec import JobSpec
    from hierseg.train.context import DistContext
    from hierseg.train.loop import build_job, evaluate, train_step

    spec = JobSpec.model_validate(raw)
    job = build_job(spec, DistContext(rank, world, rank, torch.device("cpu"), "local", False), None)
    images, labels, sources = next(iter(job.stream))
    terms = train_step(job, images, labels, sources)
    grads = [p.grad.clone() for p in job.model.parameters()]
    return images, labels, grads, [t.detach().clone() for t in terms], evaluate(job)


def _two_source_spec(data: Path, work: Path) -> dict:
    raw = tiny_spec(data, work, data={**_sources(data, "srf", "mito"), "patch_size": 32, "shuffle_buffer": 4},
                    optim={"grad_clip": None, "warmup_steps": 0}, run={"max_steps": 4, "eval_every": 4})  # fmt: skip
    raw["data"].pop("synthetic")
    return raw


def test_two_sources_train_on_two_gloo_ranks_with_global_normalisation(data, tmp_path) -> None:
    """One step on 2 ranks equals one process on both batches; evaluation: per source and together."""
    from hierseg.losses import hierarchical_loss
    from hierseg.model import build_model
    from hierseg.spec import JobSpec

    raw = _two_source_spec(data, tmp_path)
    results = run_ranks(2, _rank_job, raw)
    spec = JobSpec.model_validate(raw)
    sources = resolve_sources(spec.data)
    torch.manual_seed(spec.run.seed)
    model = build_model(spec.model, spec.hierarchy.build())
    images = torch.cat([r[0] for r in results])
    labels = torch.cat([r[1] for r in results])
    fine, coarse = model(images)
    luts = spec.hierarchy.build().luts()
    ref = hierarchical_loss(fine, coarse, labels, luts, spec.lambdas(), label_sets=sources.label_sets.table())
    ref.loss.backward()
    for _, _, grads, terms, _ in results:
        for g, p in zip(grads, model.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, atol=2e-6, rtol=1e-4)
        torch.testing.assert_close(terms[1], ref.loss_fine, atol=1e-6, rtol=1e-5)
        assert int(terms[3]) == int((labels >= 0).sum())
    summary = results[0][4]
    assert results[1][4] == summary  # one reduction: every rank holds the same figures
    hist = {n: sum(_manifest(data, n, "val")["class_histogram"]) for n in ("srf", "mito")}
    assert summary["val/srf/num_valid"] == hist["srf"] and summary["val/mito/num_valid"] == hist["mito"]
    assert summary["val/num_valid"] == hist["srf"] + hist["mito"]
    assert {"val/srf/label/iou/axon", "val/srf/label/iou/myelin", "val/mito/label/iou/mitochondria"} <= set(summary)
    assert "val/srf/label/iou/mitochondria" not in summary  # srf is scored in its own label space
    assert "val/mito/set_accuracy/not_mitochondria" in summary and "val/fine/miou" in summary


@pytest.mark.timeout(400)
def test_torchrun_two_sources_logs_per_source_metrics(data, tmp_path) -> None:
    """torchrun, 2 gloo ranks, 2 sources: one MLflow run (rank 0's, tagged torchrun), val once, val/<source>/..."""
    raw = _two_source_spec(data, tmp_path)
    raw["tracking"]["log_model"] = False
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", TRAIN]
    out = subprocess.run([*cmd, "--spec", str(write_spec(raw, tmp_path / "s.yaml"))], capture_output=True,
                         text=True, timeout=380)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = mlflow_runs(raw["tracking"]["uri"])
    assert run.data.tags["hierseg.launcher"] == "torchrun"
    m = run.data.metrics
    hist = {n: sum(_manifest(data, n, "val")["class_histogram"]) for n in ("srf", "mito")}
    assert m["val/num_valid"] == hist["srf"] + hist["mito"] and m["val/mito/num_valid"] == hist["mito"]
    assert "val/srf/label/iou/axon" in m and "val/mito/label/iou/mitochondria" in m and "val/label/miou" in m


# ----------------------------------------------------------------------------------- single location
def test_single_location_takes_the_old_path(data) -> None:
    """One shard location: the plain stream and positions, no remapping, the manifest's table, no source keys."""
    spec = validate_spec(tiny_spec(data / "mito", data, data={"synthetic": None}))
    sources = resolve_sources(spec.data)
    assert not sources.multi and sources.sources[0].remap is None
    assert sources.label_sets == LabelSets.from_config(_manifest(data, "mito", "train")["label_sets"])
    assert sources.training_record() == _manifest(data, "mito", "train")
    stream = build_train_loader(spec.data, rank=0, world_size=1, batch_size=2, seed=0, normalization=NORM,
                                num_labels=13)  # fmt: skip
    assert type(stream) is TrainStream
    _, y = next(iter(stream))
    assert set(y.unique().tolist()) <= {-1, 10, 12}
    assert np.array(stream.state_dict()["positions"]).shape == (1, 3)


# ------------------------------------------------------------------------ per-source batch norm
def test_source_batch_norm_normalises_each_source_alone() -> None:
    """Each sample takes its source's batch statistics and affine; an absent source trains with zero gradient."""
    from hierseg.model import SourceBatchNorm

    torch.manual_seed(0)
    norm = SourceBatchNorm(3, 2)
    with torch.no_grad():
        for k, layer in enumerate(norm.norms):
            layer.weight.copy_(torch.tensor([1.0, 2.0, 3.0]) * (k + 1))
            layer.bias.copy_(torch.tensor([0.5, -0.5, 0.0]) * (k + 1))
    x = torch.randn(6, 3, 4, 5, dtype=torch.float64).float() * 3 + 1
    source = torch.tensor([0, 1, 0, 1, 1, 0])
    norm.source = source
    y = norm(x)
    for k in (0, 1):
        xs = x[source == k].double()
        mean, var = xs.mean((0, 2, 3), keepdim=True), xs.var((0, 2, 3), unbiased=False, keepdim=True)
        w, b = (t.detach().double().view(1, 3, 1, 1) for t in (norm.norms[k].weight, norm.norms[k].bias))
        torch.testing.assert_close(
            y[source == k].double(), (xs - mean) / (var + 1e-5).sqrt() * w + b, atol=1e-5, rtol=0
        )
        unbiased = xs.var((0, 2, 3)).float()
        torch.testing.assert_close(norm.norms[k].running_var, 0.9 + 0.1 * unbiased)
    norm.source = torch.zeros(4, dtype=torch.int64)  # source 1 absent: zero gradient, statistics kept
    before = norm.norms[1].running_mean.clone()
    norm(x[:4]).square().sum().backward()
    assert torch.equal(norm.norms[1].weight.grad, torch.zeros(3)) and norm.norms[0].weight.grad.abs().sum() > 0
    assert torch.equal(norm.norms[1].running_mean, before)
    norm.eval()
    norm.source = 1
    want = (x - before.view(1, 3, 1, 1)) / (norm.norms[1].running_var.view(1, 3, 1, 1) + 1e-5).sqrt()
    torch.testing.assert_close(
        norm(x), want * norm.norms[1].weight.view(1, 3, 1, 1) + norm.norms[1].bias.view(1, 3, 1, 1)
    )


def test_source_prior_adds_each_samples_source_bias_to_every_head() -> None:
    """model.source_prior: the logits are the same network's without it plus the sample's source bias, per head;
    an absent source's bias gets a zero gradient."""
    from hierseg.labels import Hierarchy
    from hierseg.model import build_model
    from hierseg.spec import ModelSpec

    kw = {"norm": "source_batch", "base_channels": 4, "depth": 2}
    torch.manual_seed(5)
    with_prior = build_model(ModelSpec(**kw, source_prior=True), Hierarchy.default(), source_names=["a", "b", "c"])
    torch.manual_seed(5)
    without = build_model(ModelSpec(**kw), Hierarchy.default(), source_names=["a", "b", "c"])
    # Zero-initialised priors draw nothing: the seeded weights are the same.
    assert all(torch.equal(with_prior.state_dict()[k], v) for k, v in without.state_dict().items())
    biases = [torch.randn(3, 12), torch.randn(3, 5)]
    with torch.no_grad():
        for prior, table in zip(with_prior.priors, biases, strict=True):
            for k in range(3):
                prior.bias[k].copy_(table[k])
    x = torch.randn(4, 1, 16, 16)
    source = torch.tensor([2, 0, 2, 0])  # source 1 absent
    got, want = with_prior(x, source), without(x, source)
    for g, w, table in zip([got[0], *got[1]], [want[0], *want[1]], biases, strict=True):
        torch.testing.assert_close(g, w + table[source][:, :, None, None])
    sum(t.sum() for t in [got[0], *got[1]]).backward()
    assert torch.equal(with_prior.priors[0].bias[1].grad, torch.zeros(12))
    torch.testing.assert_close(with_prior.priors[0].bias[0].grad, torch.full((12,), 2 * 16 * 16.0))
    with_prior.eval(), without.eval()
    got, want = with_prior(x, 1), without(x, 1)
    torch.testing.assert_close(got[0], want[0] + biases[0][1][None, :, None, None])


def test_source_priors_start_closed_on_the_classes_a_source_never_labels(data, tmp_path) -> None:
    """A fresh source_prior run starts each source's prior at 0 on the classes its labels contain (alone or in a
    set) and -10 elsewhere, per fine class and coarse group."""
    from hierseg.spec import JobSpec
    from hierseg.train.context import DistContext
    from hierseg.train.loop import build_job

    raw = tiny_spec(data, tmp_path, data={**_sources(data, "srf", "mito", "vnc"), "patch_size": 32})
    raw["data"].pop("synthetic")
    raw["model"] |= {"norm": "source_batch", "source_prior": True}
    job = build_job(JobSpec.model_validate(raw), DistContext(0, 1, 0, torch.device("cpu"), "local", False), None)
    # From MAPS: srf traces axon and myelin; "not mitochondria" names every class; vnc's sets and mitochondria.
    want = {"srf": {3, 6}, "mito": set(range(12)), "vnc": {0, 5, 2, 3, 4, 10}}
    groups = {"neuron_part": {2, 3, 4}, "glia": {5}, "myelin_related": {6, 7, 8}, "organelle": {9, 10, 11},
              "non_tissue": {0, 1}}  # fmt: skip
    for k, name in enumerate(job.model.source_names):
        fine = job.model.priors[0].bias[k].tolist()
        assert fine == [0.0 if c in want[name] else -10.0 for c in range(12)], name
        coarse = job.model.priors[1].bias[k].tolist()
        assert coarse == [0.0 if members & want[name] else -10.0 for members in groups.values()], name


def _source_batch_rank_job(rank: int, world: int, raw: dict):
    from hierseg.spec import JobSpec
    from hierseg.train.context import DistContext
    from hierseg.train.loop import build_job, evaluate, train_step

    job = build_job(
        JobSpec.model_validate(raw), DistContext(rank, world, rank, torch.device("cpu"), "local", False), None
    )
    batches = iter(job.stream)
    got = []
    for _ in range(3):  # with 2 samples a rank, some step is likely to lack a source on some rank
        images, labels, sources = next(batches)
        state = {k: v.clone() for k, v in job.model.state_dict().items()}
        terms = train_step(job, images, labels, sources)
        got.append((images, labels, sources, state, [p.grad.clone() for p in job.model.parameters()], terms.loss_fine))
    return got, evaluate(job)


def test_source_batch_norm_trains_on_two_gloo_ranks_exactly(data, tmp_path) -> None:
    """model.norm source_batch (with source_prior) on 2 ranks: each step's gradients equal one process's from both
    ranks' sub-batches, each normalised per source on its own rank; validation scores each source with its
    statistics."""
    from hierseg.losses import hierarchical_loss
    from hierseg.model import build_model
    from hierseg.spec import JobSpec

    raw = _two_source_spec(data, tmp_path)
    raw["model"] |= {"norm": "source_batch", "source_prior": True}
    results = run_ranks(2, _source_batch_rank_job, raw)
    spec = JobSpec.model_validate(raw)
    table = resolve_sources(spec.data).label_sets.table()
    luts = spec.hierarchy.build().luts()
    model = build_model(spec.model, spec.hierarchy.build(), source_names=spec.data.source_names())
    for step in range(3):
        model.load_state_dict(results[0][0][step][3])
        model.zero_grad()
        outs = [model(r[0][step][0], r[0][step][2]) for r in results]  # one forward per rank's batch
        fine = torch.cat([o[0] for o in outs])
        coarse = [torch.cat([o[1][i] for o in outs]) for i in range(len(outs[0][1]))]
        labels = torch.cat([r[0][step][1] for r in results]).long()
        ref = hierarchical_loss(fine, coarse, labels, luts, spec.lambdas(), label_sets=table)
        ref.loss.backward()
        for r in results:
            torch.testing.assert_close(r[0][step][5], ref.loss_fine, atol=1e-6, rtol=1e-5)
            for g, p in zip(r[0][step][4], model.parameters(), strict=True):
                torch.testing.assert_close(g, p.grad, atol=2e-6, rtol=1e-4)
    summary = results[0][1]
    assert results[1][1] == summary and "val/mito/label/iou/mitochondria" in summary


def _source_batch_checkpoint(data: Path, tmp_path: Path, seed: int):
    """A two-source ``source_batch`` model whose source ``mito`` has other running statistics than ``srf``,
    saved as a checkpoint folder: ``(raw spec, spec, model, folder)``."""
    from hierseg.model import build_model
    from hierseg.spec import JobSpec

    raw = _two_source_spec(data, tmp_path)
    raw["model"]["norm"] = "source_batch"
    spec = JobSpec.model_validate(raw)
    torch.manual_seed(seed)
    net = build_model(spec.model, spec.hierarchy.build(), source_names=["srf", "mito"])
    with torch.no_grad():
        for name, buf in net.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.3 if ".norms.1." in name else 0.01)
            elif name.endswith("running_var"):
                buf.uniform_(0.2, 3.0) if ".norms.1." in name else buf.fill_(1.0)
    ckpt = tmp_path / "best"
    ckpt.mkdir()
    state = {"model": net.state_dict(), "spec": spec.model_dump(mode="json"), "normalization": NORM, "step": 1}
    torch.save(state, ckpt / "state.pt")
    return raw, spec, net, ckpt


def test_source_batch_model_predicts_with_its_source_statistics(data, tmp_path, capsys) -> None:
    """predict --source NAME equals a plain batch-norm U-Net holding that source's layers; a missing or unknown
    --source, or --source for another model, is a one-line error naming the choices."""
    import tifffile

    from hierseg.model import build_model
    from hierseg.serve.infer import PredictOptions, main, predict_image
    from hierseg.spec import JobSpec

    raw, spec, net, ckpt = _source_batch_checkpoint(data, tmp_path, 3)
    image = (np.random.default_rng(0).random((80, 72)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "img.tif", image)
    args = ["--model", str(ckpt), "--input", str(tmp_path / "img.tif"), "--quiet", "--decode", "fine"]
    assert main([*args, "--output", str(tmp_path / "none")]) == 2
    assert "--source one of srf, mito" in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "bad"), "--source", "vnc"]) == 2
    assert "--source vnc: not a data source of this model; one of srf, mito" in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "out"), "--source", "mito"]) == 0
    plain_raw = {**raw, "model": {**raw["model"], "norm": "batch"}}
    plain = build_model(JobSpec.model_validate(plain_raw).model, spec.hierarchy.build())
    mito = {k.replace(".norms.1.", "."): v for k, v in net.state_dict().items() if ".norms.0." not in k}
    plain.load_state_dict(mito)
    want = predict_image(plain.eval(), image, options=PredictOptions(tile=32, overlap=4, amp=False))
    got = tifffile.imread(tmp_path / "out" / "fine_labels.tif")
    np.testing.assert_array_equal(got, want["fine_labels"])
    plain_ckpt = tmp_path / "plain"
    plain_ckpt.mkdir()
    torch.save(
        {"model": plain.state_dict(), "spec": plain_raw, "normalization": NORM, "step": 0}, plain_ckpt / "state.pt"
    )
    assert main(["--model", str(plain_ckpt), *args[2:], "--output", str(tmp_path / "p"), "--source", "mito"]) == 2
    assert "drop --source" in capsys.readouterr().err


def test_source_batch_needs_several_sources(data, tmp_path) -> None:
    """model.norm source_batch with one shard location is a spec error naming the field and the fix."""
    with pytest.raises(
        SpecError, match=r"model.norm source_batch keeps statistics per data source.*use model.norm: batch"
    ):
        validate_spec(tiny_spec(data / "mito", data, data={"synthetic": None}, model={"norm": "source_batch"}))


def test_source_prior_needs_source_batch(data) -> None:
    """model.source_prior without per-source statistics is a spec error naming the field and the fix."""
    with pytest.raises(SpecError, match=r"model.source_prior .* set model.norm: source_batch"):
        validate_spec(tiny_spec(data / "mito", data, data={"synthetic": None}, model={"source_prior": True}))


def test_logged_source_batch_model_takes_its_source_as_a_param(data, tmp_path) -> None:
    """The MLflow pyfunc of a source_batch model predicts with params={"source": NAME} as predict --source does,
    and without it raises the message naming the sources."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from hierseg.serve.infer import default_options, load_predictor
    from hierseg.serve.pyfunc import log_checkpoint_model
    from tests.train_utils import sqlite_store

    _, spec, _, ckpt = _source_batch_checkpoint(data, tmp_path, 4)
    store = sqlite_store(tmp_path)
    client = MlflowClient(tracking_uri=store)
    run_id = client.create_run(client.create_experiment("sbn")).info.run_id
    uri = log_checkpoint_model(store, run_id, ckpt, spec)
    mlflow.set_tracking_uri(store)
    pyfunc = mlflow.pyfunc.load_model(uri)
    image = (np.random.default_rng(1).random((1, 1, 48, 40)) * 255).astype(np.float32)  # [N, C, H, W]
    got = pyfunc.predict(image, params={"source": "mito"})
    predictor = load_predictor(str(ckpt))
    want = predictor.predict(image[0, 0], default_options(predictor, source="mito"))["fine_labels"]
    np.testing.assert_array_equal(got[0], want)
    with pytest.raises(Exception, match="--source one of srf, mito"):
        pyfunc.predict(image)
