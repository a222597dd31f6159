"""The job spec: one validated, typed, documented description of a training job.

``load_spec(path, overrides)`` reads YAML (``safe_load``, duplicate keys rejected), applies
``key.path=value`` overrides, and validates into :class:`JobSpec`. Any problem raises
:class:`SpecError` listing every bad field with its dotted path and how to fix it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PositiveFloat,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hierseg.labels import DEFAULT_GROUPS, Hierarchy, LabelSets, closest, first_duplicate

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]


class SpecError(ValueError):
    """A job spec that cannot be used; ``errors`` holds one line per bad field."""

    def __init__(self, errors: list[str], source: str | None = None):
        self.errors = errors
        head = f"invalid job spec {source}" if source else "invalid job spec"
        super().__init__(head + ":\n" + "\n".join(f"  - {e}" for e in errors))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, use_attribute_docstrings=True)


# ----------------------------------------------------------------------------------------------- data
class AugmentSpec(_Strict):
    """EM augmentations; geometric ones apply to image and label alike, intensity ones to the image."""

    flips: bool = True
    """Random horizontal/vertical flips."""
    rot90: bool = True
    """Random multiples of 90-degree rotation."""
    elastic: float = Field(0.0, ge=0.0, le=1.0)
    """Probability of a small elastic/affine warp (nearest-neighbour for labels); 0 disables."""
    contrast: float = Field(0.1, ge=0.0, lt=1.0)
    """Max relative contrast jitter; brightness shifts by up to this many patch standard deviations."""
    gamma: float = Field(0.1, ge=0.0, lt=1.0)
    """Max relative gamma jitter (on the patch rescaled to its own [min, max])."""
    noise: float = Field(0.1, ge=0.0)
    """Std of additive Gaussian noise in units of the patch's standard deviation."""
    blur: float = Field(0.0, ge=0.0, le=1.0)
    """Probability of a light Gaussian blur."""


class SyntheticSpec(_Strict):
    """Synthetic EM-like data generated into ``data.train``/``data.val`` when those are absent."""

    num_train: PosInt = 48
    """Number of synthetic training images."""
    num_val: PosInt = 12
    """Number of synthetic validation images."""
    image_size: PosInt = 256
    """Side of each synthetic image in pixels (stored whole; training crops ``data.patch_size``)."""
    seed: int = 0
    """Seed of the generator (the same seed gives byte-identical shards)."""


class NormalizationSpec(_Strict):
    """How raw pixel values become the network input; one function for shards, loader and predict."""

    mode: Literal["zscore", "percentile", "range"] = "zscore"
    """``zscore``: per slice ``(x - mean) / std`` (the EM default); ``percentile``: the training split's
    ``percentiles`` -> [0, 1]; ``range``: ``range`` (or the integer dtype's full range) -> [0, 1]."""
    percentiles: tuple[float, float] = (1.0, 99.0)
    """Low and high percentile for ``mode: percentile`` (multiples of 0.5, recorded by the shard builder)."""
    range: tuple[float, float] | None = None
    """Fixed ``[lo, hi]`` for ``mode: range``; ``null``: the full range of the shards' integer dtype."""

    @model_validator(mode="after")
    def _valid(self) -> NormalizationSpec:
        lo, hi = self.percentiles
        if not (0 <= lo < hi <= 100) or any(round(p * 2) != p * 2 for p in self.percentiles):
            raise ValueError(f"percentiles {list(self.percentiles)}: need 0 <= low < high <= 100, multiples of 0.5")
        if self.range is not None and not self.range[0] < self.range[1]:
            raise ValueError(f"range {list(self.range)}: the low value must be below the high value")
        return self


class LabelSetSpec(_Strict):
    """One partial label: the stored value ``12 + position`` means "one of these fine classes"."""

    name: str
    """Name of the set (logged as ``val/set_accuracy/<name>``)."""
    classes: list[str | int]
    """Fine class names (or indices) in the set."""
    id: int | None = None
    """Optional stored value (``12 + position``), as the manifest records it; checked when given."""


SOURCE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
RESERVED_SOURCE_NAMES = frozenset({"fine", "label", "num_valid", "num_set_pixels", "set_accuracy"})
"""First parts of the together keys (``val/fine/...``): a source with such a name would read as one of them."""
DEFAULT_SOURCE = "default"
"""Name of the one source a plain ``data.train: <shards>`` string describes (never in a metric key)."""


class ValSourceSpec(_Strict):
    """One validation data set: its shards, scored on their own as ``val/<name>/...``."""

    name: str = Field(pattern=SOURCE_NAME_PATTERN)
    """Source name (letters, digits, ``_``, ``-``): the ``<source>`` of ``val/<source>/...`` metric keys."""
    shards: str
    """Shard location of this source (a folder with ``manifest.json``, a glob, a brace pattern, or URLs)."""


class SourceSpec(ValSourceSpec):
    """One training data set: its shards (with their own label map and sets) and how often it is drawn."""

    weight: float = Field(1.0, gt=0)
    """Relative sampling weight: each training sample comes from this source with probability weight / sum."""


def _location_or_list(value: Any) -> str | None:
    """Which form of ``data.train``/``data.val`` a value is (None: neither; pydantic reports it)."""
    if isinstance(value, str):
        return "location"
    if isinstance(value, list):
        return "sources"
    return None


_FORM_ERROR = "must be a shard location (a string) or a list of sources {name, shards[, weight]}"
UNION_TAGS = ("location", "sources")
"""Tags of the two forms; dropped from error paths so they read ``data.train.0.weight``."""
TrainData = Annotated[
    Annotated[str, Tag("location")] | Annotated[list[SourceSpec], Tag("sources")],
    Discriminator(_location_or_list, custom_error_type="data_form", custom_error_message=_FORM_ERROR),
]
ValData = Annotated[
    Annotated[str, Tag("location")] | Annotated[list[ValSourceSpec], Tag("sources")],
    Discriminator(_location_or_list, custom_error_type="data_form", custom_error_message=_FORM_ERROR),
]


class DataSpec(_Strict):
    """Where the shards are and how they are streamed into the workers."""

    train: TrainData
    """Training shards: a folder with ``manifest.json``, a glob, a brace pattern, or URLs; or a list of
    sources ``{name, shards, weight}`` (several data sets, each with its own label map, in one run)."""
    val: ValData
    """Validation shards (same forms as ``train``; with sources, a list of ``{name, shards}`` named as in
    ``train``, scored per source and together); every sample is evaluated exactly once."""
    batch_size: PosInt
    """Global batch size per step, summed over all workers (must divide by ``run.num_workers``)."""
    patch_size: PosInt | list[PosInt] = 256
    """Side of the square crop drawn at a fresh random position from a stored slice for every training
    sample (validation scores whole slices through the same sliding window as ``hierseg predict``); with
    ``model.dims: 3``, a 3D crop ``[z, y, x]`` from a stored 3D block, with sides the network's pooling divides
    and at most the largest block (validation scores whole blocks in non-overlapping windows of this size)."""
    normalization: NormalizationSpec = NormalizationSpec()
    """Input normalisation, recorded in checkpoints and the logged model so prediction applies the same."""
    num_workers: NonNegInt = 2
    """DataLoader worker processes per training rank (0 reads in the training process)."""
    shuffle_buffer: NonNegInt = 256
    """Samples held in the shuffle buffer of each loader (0 disables shuffling)."""
    class_balanced: bool = False
    """Centre each training crop on a pixel of a class drawn by inverse frequency (valid single-class pixels
    of the training manifest, as nnU-Net oversamples foreground); uniform positions otherwise."""
    on_bad_sample: Literal["stop", "skip"] = "stop"
    """``stop``: a corrupt sample fails the job naming shard and key; ``skip``: skip it with a counted warning."""
    augment: AugmentSpec = AugmentSpec()
    """Training augmentations (validation is never augmented)."""
    synthetic: SyntheticSpec | None = None
    """When set and the shard folders are absent, generate synthetic EM-like shards there first."""
    label_sets: list[LabelSetSpec] | None = None
    """Partial-label table (label ``12 + i`` = "one of set ``i``'s classes"); ``null``: the training manifest's."""

    @field_validator("patch_size")
    @classmethod
    def _patch_zyx(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, list) and len(v) != 3:
            raise ValueError(
                f"{v}: a list is a 3D patch [z, y, x] (three sides, with model.dims: 3); a 2D patch is one side, "
                "for example 256"
            )
        return v

    @field_validator("label_sets")
    @classmethod
    def _valid_sets(cls, v: list[LabelSetSpec] | None) -> list[LabelSetSpec] | None:
        if v is not None:
            LabelSets.from_config([s.model_dump() for s in v], where="data.label_sets")  # raises naming the set
        return v

    @field_validator("train", "val")
    @classmethod
    def _valid_sources(cls, v: str | list[ValSourceSpec]) -> str | list[ValSourceSpec]:
        if isinstance(v, str):
            return v
        if not v:
            raise ValueError("the list of sources is empty; give at least one {name, shards} (or one shard location)")
        names = [s.name for s in v]
        dup = first_duplicate(names)
        if dup is not None:
            raise ValueError(f"source name {dup!r} is used twice; source names must be unique")
        reserved = [n for n in names if n in RESERVED_SOURCE_NAMES or n == DEFAULT_SOURCE]
        if reserved:
            raise ValueError(
                f"source name {reserved[0]!r} is reserved (it would read as a val/{reserved[0]}/... key); rename it"
            )
        return v

    @model_validator(mode="after")
    def _same_form(self) -> DataSpec:
        multi_train, multi_val = isinstance(self.train, list), isinstance(self.val, list)
        if multi_train != multi_val:
            raise ValueError(
                "data.train and data.val must take the same form: both one shard location, or both lists of "
                "sources (validation sources named as in data.train)"
            )
        if multi_val:
            unknown = [s.name for s in self.val if s.name not in {t.name for t in self.train}]
            if unknown:
                raise ValueError(
                    f"data.val source {unknown[0]!r} is not a data.train source ({', '.join(self.source_names())}); "
                    "validation sources must use the training source names"
                )
        if multi_train and self.synthetic is not None:
            raise ValueError("data.synthetic generates one data set; remove it, or give data.train as one location")
        return self

    @property
    def multi_source(self) -> bool:
        """Several named data sets (``val/<source>/...`` metrics) rather than one shard location."""
        return isinstance(self.train, list)

    def source_names(self) -> list[str]:
        return [s.name for s in self.sources("train")]

    def sources(self, split: Literal["train", "val"]) -> list[SourceSpec]:
        """The split's sources; one plain location is the single source ``default`` of weight 1."""
        value = getattr(self, split)
        if isinstance(value, str):
            return [SourceSpec(name=DEFAULT_SOURCE, shards=value)]
        return [SourceSpec(name=s.name, shards=s.shards, weight=getattr(s, "weight", 1.0)) for s in value]


# ---------------------------------------------------------------------------------------------- model
class ModelSpec(_Strict):
    """U-Net backbone (2D, or 3D planned from the voxel size) with a fine head and one sigmoid head per level."""

    dims: Literal[2, 3] = 2
    """Spatial dimensions: 2 (slices or tiles; 2.5D context as channels) or 3 (a 3D U-Net on ``[z, y, x]``
    crops of 3D shards from ``make-shards --stack --dims 3``, ``data.patch_size`` then a list of three sides).
    3D models train, validate and predict (``hierseg predict`` in blended ``[z, y, x]`` windows, ``--ray`` too);
    a 3D run's logged MLflow model predicts one ``[D, H, W]`` volume."""
    voxel_size: list[PositiveFloat] | None = None
    """Voxel size ``[z, y, x]`` in nm that plans the 3D network (``dims: 3`` only): an axis is pooled, and
    convolved across, only while its spacing is under twice the finest (nnU-Net's rule), so coarse-z stacks
    pool in xy first; ``null``: the training manifest's ``voxel_size`` (``make-shards --voxel-size``), else
    isotropic with a warning. The resolved value is saved in the checkpoints' spec."""

    in_channels: PosInt = 1
    """Image channels (1 for EM; 2.5D context slices add channels)."""
    base_channels: PosInt = 32
    """Channels of the first encoder stage; doubled at every down-sampling."""
    depth: int = Field(4, ge=1, le=7)
    """Number of down-sampling stages."""
    norm: Literal["batch", "group", "instance", "none", "source_batch"] = "group"
    """Normalisation layer (group norm is independent of the per-rank batch size). ``source_batch``: batch
    norm with its own statistics and affine per data source (several ``data.train`` sources only), so crops
    of different microscopes are never normalised together; such a model predicts with ``--source NAME``."""
    source_prior: bool = False
    """With ``norm: source_batch``: every head also learns one logit bias per data source, starting at 0 for the
    classes the source's training labels contain and at -10 for the others, so a source's pixels do not teach
    the shared head against classes the source never labels (every labelled srf_tem pixel is a known negative
    for glia)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout before the heads."""
    channels_last: bool = False
    """channels_last memory format on GPU (ignored on CPU). Measured on an H100 (bench/step.py): 1.65x
    (fp32) and 2.0x (bf16) faster with ``norm: batch``, but 0.83x with ``norm: group``."""
    compile: bool = False
    """Wrap the model in ``torch.compile``."""

    @field_validator("voxel_size")
    @classmethod
    def _voxel_size_for_3d(cls, v: list[float] | None, info: ValidationInfo) -> list[float] | None:
        if v is not None and len(v) != 3:
            raise ValueError(f"{v}: give three sizes [z, y, x] in nm")
        if v is not None and info.data.get("dims") == 2:  # dims is declared first, so it is validated already
            raise ValueError("only the 3D network uses it (model.dims is 2); remove it, or set model.dims: 3")
        return v


class LevelSpec(_Strict):
    name: str
    """Name of the level (its metrics are logged as ``val/<name>/...``)."""
    groups: dict[str, list[str]]
    """Group name -> fine class names; every fine class must be in at least one group."""


class HierarchySpec(_Strict):
    """Coarse levels over the fine classes; each level is one sigmoid head."""

    levels: list[LevelSpec] = Field(
        default_factory=lambda: [LevelSpec(name="coarse", groups={k: list(v) for k, v in DEFAULT_GROUPS.items()})]
    )
    """Levels of groups; the default is the plan's 5 groups."""

    @model_validator(mode="after")
    def _valid(self) -> HierarchySpec:
        self.build()  # raises ValueError naming the culprit
        return self

    def build(self) -> Hierarchy:
        return Hierarchy.from_config(self.model_dump())


class LossSpec(_Strict):
    lambda_coarse: float | list[float] = 0.2
    """Weight of the coarse BCE term; one number for every level, or one per level."""

    @field_validator("lambda_coarse")
    @classmethod
    def _non_negative(cls, v: float | list[float]) -> float | list[float]:
        values = v if isinstance(v, list) else [v]
        if any(x < 0 for x in values):
            raise ValueError("must be >= 0 (0 disables the coarse term); the plan suggests 0.05-0.5")
        return v


class OptimSpec(_Strict):
    """AdamW with linear warm-up then cosine decay."""

    lr: float = Field(1e-3, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(1e-4, ge=0)
    """AdamW weight decay (not applied to norms and biases)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: NonNegInt = 50
    """Steps of linear warm-up from 0 to ``lr``."""
    min_lr_ratio: float = Field(0.05, ge=0, le=1)
    """Final learning rate as a fraction of ``lr`` at the end of the cosine."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value; ``null`` disables clipping."""


class RunSpec(_Strict):
    """How the job runs: processes, devices, length, cadence, and where outputs go."""

    name: str = Field("hierseg", min_length=1, pattern=r"^[^/\\\s][^/\\]*$")
    """Run name: checkpoints go to ``<storage_path>/<name>`` and it names the MLflow run (no slashes)."""
    num_workers: PosInt = 2
    """Training processes (ranks); one per GPU when ``use_gpu``."""
    use_gpu: bool = False
    """Train on GPUs (NCCL) instead of CPUs (gloo)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """``bf16`` autocast on GPU (loss accumulated in fp32); ignored with a warning on CPU."""
    max_steps: PosInt
    """Optimizer steps of the whole run."""
    eval_every: PosInt | None = None
    """Evaluate every N steps (and always at the end); ``null``: only at the end."""
    checkpoint_every: PosInt | None = None
    """Checkpoint every N steps (and always at the end); ``null``: at each evaluation."""
    log_every: PosInt = 10
    """Log all-reduced loss terms every N steps."""
    seed: int = 0
    """Seed for model init, data order and augmentation (per rank and loader worker)."""
    storage_path: str = "./hierseg_runs"
    """Checkpoints and Ray results (shared storage across nodes on a cluster)."""
    keep_checkpoints: PosInt = 2
    """Keep the best K checkpoints by ``best_metric`` (plus the latest)."""
    best_metric: str = "val/label/miou"
    """Validation metric that ranks checkpoints and chooses the logged model (default: mean IoU over the
    values the labels use, so classes without data never rank a checkpoint)."""
    best_mode: Literal["max", "min"] = "max"
    """Whether a larger (``max``) or smaller (``min``) ``best_metric`` is better."""
    max_failures: NonNegInt = 2
    """Worker-group restarts Ray may do from the latest checkpoint after a failure."""
    resume: bool = True
    """Resume from the latest checkpoint under ``<storage_path>/<name>`` if one exists."""
    stop_at_step: PosInt | None = None
    """Checkpoint and exit cleanly at this step (resume later by running the same spec); ``null``: run to the end."""


class TrackingSpec(_Strict):
    uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI: a SQLite file, or ``http://host:port`` of an MLflow server."""
    experiment: str = "hierseg"
    """MLflow experiment name."""
    run_name: str | None = None
    """MLflow run name (default: ``run.name``)."""
    registered_model: str | None = None
    """Register the best checkpoint under this model name (``null``: log it, do not register)."""
    tags: dict[str, str] = Field(default_factory=dict)
    """Extra tags on the MLflow run (for example a sweep id)."""
    log_model: bool = True
    """Log the best checkpoint as an MLflow model at the end."""


class JobSpec(_Strict):
    """A whole training job."""

    data: DataSpec
    model: ModelSpec = ModelSpec()
    hierarchy: HierarchySpec = HierarchySpec()
    loss: LossSpec = LossSpec()
    optim: OptimSpec = OptimSpec()
    run: RunSpec
    tracking: TrackingSpec = TrackingSpec()

    @model_validator(mode="after")
    def _cross_field(self) -> JobSpec:
        if self.data.batch_size % self.run.num_workers:
            raise ValueError(
                f"data.batch_size ({self.data.batch_size}) must be a multiple of run.num_workers "
                f"({self.run.num_workers}): every rank takes batch_size / num_workers images"
            )
        if isinstance(self.loss.lambda_coarse, list) and len(self.loss.lambda_coarse) != len(self.hierarchy.levels):
            raise ValueError(
                f"loss.lambda_coarse has {len(self.loss.lambda_coarse)} values but hierarchy.levels has "
                f"{len(self.hierarchy.levels)}: give one per level or a single number"
            )
        clash = set(self.data.source_names()) & {lv.name for lv in self.hierarchy.levels}
        if self.data.multi_source and clash:
            raise ValueError(
                f"data source {sorted(clash)[0]!r} has the name of a hierarchy level: val/{sorted(clash)[0]}/... "
                "would mean both; rename the source"
            )
        if self.model.source_prior and self.model.norm != "source_batch":
            raise ValueError(
                "model.source_prior learns a bias per data source, which only a model.norm: source_batch model "
                "is given; set model.norm: source_batch (several data.train sources) or drop model.source_prior"
            )
        if self.model.norm == "source_batch" and not self.data.multi_source:
            raise ValueError(
                "model.norm source_batch keeps statistics per data source, but data.train is one shard location; "
                "use model.norm: batch, or list the sources in data.train"
            )
        self._check_patch_dims()
        if self.run.precision == "bf16" and not self.run.use_gpu:
            warnings.warn("run.precision=bf16 is ignored on CPU (run.use_gpu is false); training in fp32", stacklevel=2)
        return self

    def _check_patch_dims(self) -> None:
        """``data.patch_size`` takes the form of ``model.dims``, and a 3D patch pools without padding.

        Without ``model.voxel_size`` the plan depends on the training manifest's voxel size, so the pooling
        check waits for the preflight (:func:`hierseg.train.launch.resolve_voxel_size`) rather than
        refusing sides that the data's plan accepts (an isotropic plan pools z as often as x and y).
        """
        patch, dims = self.data.patch_size, self.model.dims
        if dims == 2 and isinstance(patch, list):
            raise ValueError(
                f"data.patch_size {patch} is a 3D patch [z, y, x] but model.dims is 2; give one side (for example "
                "256), or set model.dims: 3"
            )
        if dims == 3 and not isinstance(patch, list):
            raise ValueError(
                f"data.patch_size {patch} is a 2D side but model.dims is 3; give a 3D patch [z, y, x], "
                "for example [16, 128, 128]"
            )
        if dims == 3 and self.model.voxel_size is not None:
            from hierseg.model import check_patch_size, plan_unet  # here, not at the top: hierseg.model imports spec

            check_patch_size(plan_unet(self.model.depth, 3, self.model.voxel_size), patch)

    def lambdas(self) -> list[float]:
        lam = self.loss.lambda_coarse
        return list(lam) if isinstance(lam, list) else [lam] * len(self.hierarchy.levels)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted-key view of the resolved spec (MLflow params)."""
        return _flatten(self.model_dump(mode="json"))


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# -------------------------------------------------------------------------------------------- loading
class _UniqueKeyLoader(yaml.SafeLoader):
    """``safe_load`` that rejects duplicate mapping keys instead of silently keeping the last."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError([f"YAML syntax error at{where}: {problem}"], source) from None


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; the value is parsed as YAML (``3`` -> int, ``[1,2]`` -> list)."""
    errors = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            errors.append(f"override {item!r}: expected key.path=value, for example loss.lambda_coarse=0.1")
            continue
        parts = key.strip().split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                errors.append(f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
                break
            node = child
        else:
            node[parts[-1]] = parse_yaml(value, f"override {key}") if value.strip() else None
    if errors:
        raise SpecError(errors)
    return raw


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The first spec section class inside an annotation (through optionals, unions, lists, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The spec section class a validation error location points into (list indices stay in the list's model)."""
    model: type[BaseModel] | None = JobSpec
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        model = _model_in(model.model_fields[part].annotation)
    return model


def _describe(err: dict[str, Any]) -> str:
    loc = tuple(p for p in err["loc"] if p not in UNION_TAGS)  # the form's tag is no part of the field path
    path = ".".join(str(p) for p in loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        known = list(parent.model_fields) if parent else []
        close = closest(str(loc[-1]), known)
        hint = f"did you mean {close}?" if close else f"allowed keys: {', '.join(known)}"
        return f"{path}: unknown field; {hint}"
    if kind == "missing":
        return f"{path}: required field is missing; add it to the spec"
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "string_pattern_mismatch" and err.get("ctx", {}).get("pattern") == SOURCE_NAME_PATTERN:
        msg = f"{err.get('input')!r}: a source name holds letters, digits, _ and - only (it is a metric key part)"
    if kind in {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}:
        msg = f"{msg} (got {err.get('input')!r})"
    return f"{path}: {msg}"


def validate_spec(raw: Any, source: str | None = None) -> JobSpec:
    if not isinstance(raw, dict):
        kind = "empty" if raw is None else f"a {type(raw).__name__}"
        raise SpecError([f"the top level must be a mapping with sections data, run, ... (got {kind})"], source)
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError([_describe(err) for err in e.errors()], source) from None


def load_spec(path: str | Path, overrides: Iterable[str] = ()) -> JobSpec:
    """Read a YAML job spec, apply ``key.path=value`` overrides, validate; raise :class:`SpecError`."""
    p = Path(path)
    if not p.is_file():
        raise SpecError([f"spec file not found: {p} (check the path passed to --spec)"], str(p))
    text = p.read_text()
    if not text.strip():
        raise SpecError(["the spec file is empty; start from examples/specs/quickstart.yaml"], str(p))
    raw = parse_yaml(text, str(p))
    if isinstance(raw, dict):
        raw = apply_overrides(raw, overrides)
    return validate_spec(raw, str(p))


# ------------------------------------------------------------------------------------------ reference
def _type_name(annotation: Any) -> str:
    """A readable type for the docs table (``int > 0 or null``, ``one of ['fp32', 'bf16']``)."""
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        bounds = [m for m in args[1:] if hasattr(m, "metadata")] or list(args[1:])
        text = _type_name(args[0])
        for meta in (x for b in bounds for x in getattr(b, "metadata", [b])):
            for attr, sym in (("gt", ">"), ("ge", ">=")):
                if getattr(meta, attr, None) is not None:
                    text += f" {sym} {getattr(meta, attr)}"
        return text
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args if a is not Ellipsis)}]"
    return getattr(annotation, "__name__", str(annotation))


def _default_text(info: Any) -> str:
    from pydantic_core import PydanticUndefined

    if info.is_required():
        return "**required**"
    value = info.default_factory() if info.default_factory is not None else info.default
    if value is PydanticUndefined:
        return "see below"
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return "see meaning"  # e.g. the plan's five groups: too long for a table cell
    return f"`{value!r}`"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        candidates = (ann, *getattr(ann, "__args__", ()))
        nested = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nested is not None and typing_origin_is_model(ann):
            rows += _rows(nested, f"{prefix}{name}.")
            continue
        doc = " ".join((info.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{prefix}{name}` | {_type_name(ann)} | {_default_text(info)} | {doc} |")
    return rows


def typing_origin_is_model(annotation: Any) -> bool:
    """A field that is a section (a nested model, optional or not) rather than a list of models."""
    import typing

    return typing.get_origin(annotation) not in (list, tuple, dict)


def spec_table() -> str:
    """The README's spec reference table, generated from the field declarations (so the two never drift)."""
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for section, info in JobSpec.model_fields.items():
        model = info.annotation
        rows += _rows(model, f"{section}.")
    return "\n".join(rows)


if __name__ == "__main__":
    print(spec_table())
