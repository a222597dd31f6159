"""``hierseg promote``: pick the best finished run by a metric and point a registry alias at its model.

Why aliases: MLflow stages are deprecated; an alias (``champion``) is a movable name that
``hierseg predict --model models:/NAME@champion`` resolves at load time, so promoting a new
checkpoint needs no change downstream.

Candidates are runs that logged a model named ``model`` (training logs its best checkpoint there):
runs of an experiment, of one sweep (tag ``sweep=<id>`` or children of a parent run), or named runs;
filtered by status (default FINISHED) and tags. The metric is read from the logged checkpoint's
model card (its value at the checkpoint), falling back to the run's last logged value.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_METRIC = "val/label/miou"  # the spec's default run.best_metric (test_registry checks they agree)
MODEL_NAME = "model"
_NOISE_PARAMS = {"run.name", "tracking.run_name", "run.storage_path"}
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class RegistryError(ValueError):
    """A user error (unknown experiment, metric, alias, version; unreachable store); names the fix."""


def _client(tracking_uri: str | None) -> Any:
    """An MlflowClient on a store that answers; unreachable servers and missing SQLite files are errors."""
    from mlflow.tracking import MlflowClient

    from hierseg.tracking import check_tracking_uri

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise RegistryError("no MLflow store given: pass --tracking-uri (or --spec, or set MLFLOW_TRACKING_URI)")
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise RegistryError(f"MLflow store {uri}: file does not exist; check --tracking-uri (is the path absolute?)")
    try:
        check_tracking_uri(uri, timeout_s=10.0)
    except ConnectionError as e:
        raise RegistryError(str(e)) from None
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# ------------------------------------------------------------------------------------ URI resolution
def _versions_text(client: Any, name: str) -> str:
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    return ", ".join(map(str, versions)) or "none"


def resolve_model_uri(uri: str, tracking_uri: str | None) -> Any:
    """Check that ``models:/NAME@alias`` / ``models:/NAME/VERSION`` / ``runs:/ID/...`` exists; return version or run.

    Errors list what does exist (registered models, versions, aliases), so a typo is one look away.
    """
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    if uri.startswith("runs:/"):
        run_id = uri.removeprefix("runs:/").split("/")[0]
        try:
            return client.get_run(run_id)
        except MlflowException:
            raise RegistryError(f"--model {uri}: run {run_id!r} does not exist in {client.tracking_uri}") from None
    body = uri.removeprefix("models:/")
    name, alias, version = _split_model(body, uri)
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models())
        raise RegistryError(f"--model {uri}: no registered model {name!r}; registered: {names or 'none'}") from None
    if alias is not None:
        if alias not in model.aliases:
            have = ", ".join(f"@{a} -> {v}" for a, v in sorted(model.aliases.items())) or "none"
            raise RegistryError(f"--model {uri}: model {name!r} has no alias {alias!r}; aliases: {have}")
        return client.get_model_version_by_alias(name, alias)
    try:
        return client.get_model_version(name, version)
    except MlflowException:
        raise RegistryError(
            f"--model {uri}: model {name!r} has no version {version}; versions: {_versions_text(client, name)}"
        ) from None


def _split_model(body: str, uri: str) -> tuple[str, str | None, str | None]:
    if "@" in body:
        name, alias = body.split("@", 1)
        return name, alias, None
    if "/" in body:
        name, version = body.rsplit("/", 1)
        if version.isdigit():
            return name, None, version
    raise RegistryError(f"--model {uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")


# ---------------------------------------------------------------------------------------- candidates
@dataclass
class Candidate:
    run: Any
    model_id: str
    value: float = math.nan

    @property
    def run_id(self) -> str:
        return self.run.info.run_id


def _experiment_ids(client: Any, names: list[str]) -> list[str]:
    if not names:
        return [e.experiment_id for e in client.search_experiments()]
    ids = []
    for name in names:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            have = sorted(e.name for e in client.search_experiments())
            raise RegistryError(f"--experiment {name!r} does not exist; experiments: {have}")
        ids.append(exp.experiment_id)
    return ids


def _search(client: Any, exp_ids: list[str], filters: list[str]) -> list[Any]:
    return client.search_runs(exp_ids, filter_string=" and ".join(filters), max_results=5000)


def find_runs(client: Any, args: argparse.Namespace) -> list[Any]:
    """Runs matching experiment / sweep / named runs, status and tag filters (no model check yet)."""
    exp_ids = _experiment_ids(client, args.experiment)
    base = [f"tags.`{k}` = '{v}'" for k, v in (_kv(t) for t in args.tag)]
    if args.sweep:
        by_tag = _search(client, exp_ids, [*base, f"tags.sweep = '{args.sweep}'"])
        by_parent = _search(client, exp_ids, [*base, f"tags.`mlflow.parentRunId` = '{args.sweep}'"])
        runs = {r.info.run_id: r for r in by_tag + by_parent}
    else:
        runs = {r.info.run_id: r for r in _search(client, exp_ids, base)}
    if args.run:
        wanted = set(args.run)
        runs = {i: r for i, r in runs.items() if i in wanted or r.info.run_name in wanted}
        for w in wanted:
            if _RUN_ID.match(w) and w not in runs and not base and not args.sweep:
                try:
                    runs[w] = client.get_run(w)
                except Exception:
                    raise RegistryError(f"--run {w}: no such run in {client.tracking_uri}") from None
    statuses = {s.upper() for s in args.status}
    return [r for r in runs.values() if r.info.status in statuses]


def _kv(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise RegistryError(f"--tag {text!r}: expected KEY=VALUE, e.g. --tag sweep=lambda")
    k, v = text.split("=", 1)
    return k.strip(), v.strip()


def with_models(client: Any, runs: list[Any]) -> list[Candidate]:
    """Keep runs that logged a model named ``model`` (MLflow 3 logged models, searched per experiment)."""
    by_exp: dict[str, set[str]] = {}
    for r in runs:
        by_exp.setdefault(r.info.experiment_id, set()).add(r.info.run_id)
    model_of: dict[str, str] = {}
    for exp_id, ids in by_exp.items():
        for m in client.search_logged_models(experiment_ids=[exp_id], filter_string=f"name = '{MODEL_NAME}'"):
            if m.source_run_id in ids and str(m.status).endswith("READY"):
                model_of.setdefault(m.source_run_id, m.model_id)
    return [Candidate(r, model_of[r.info.run_id]) for r in runs if r.info.run_id in model_of]


def metric_value(client: Any, cand: Candidate, metric: str) -> float:
    """The metric at the logged checkpoint (model card), else the run's last logged value; NaN if absent."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            card = json.loads(Path(client.download_artifacts(cand.run_id, "model_card.json", tmp)).read_text())
            if metric in card.get("metrics", {}):
                return float(card["metrics"][metric])
        except Exception:  # no card (older run): fall back to the run's metrics
            pass
    return float(cand.run.data.metrics.get(metric, math.nan))


# ------------------------------------------------------------------------------------- rank and table
def rank(cands: list[Candidate], metric: str, mode: str) -> list[Candidate]:
    """Candidates that have the metric, best first; ties keep the newest run first."""
    scored = [c for c in cands if not math.isnan(c.value)]
    scored.sort(key=lambda c: -c.run.info.start_time)
    scored.sort(key=lambda c: -c.value if mode == "max" else c.value)
    return scored


def differing_params(cands: list[Candidate]) -> list[str]:
    """Param keys whose values are not the same in every candidate (names and paths of runs left out)."""
    keys = sorted({k for c in cands for k in c.run.data.params} - _NOISE_PARAMS)
    return [k for k in keys if len({c.run.data.params.get(k, "") for c in cands}) > 1]


def table(cands: list[Candidate], metric: str) -> str:
    """Plain-text table: rank, run id, run name, differing params, metric."""
    params = differing_params(cands) if len(cands) > 1 else []
    head = ["#", "run_id", "name", *params, metric]
    rows = [
        [str(i + 1), c.run_id, c.run.info.run_name or "", *(c.run.data.params.get(p, "") for p in params),
         "n/a" if math.isnan(c.value) else f"{c.value:.4f}"]
        for i, c in enumerate(cands)
    ]  # fmt: skip
    widths = [max(len(r[j]) for r in [head, *rows]) for j in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [head, *rows])


# ---------------------------------------------------------------------------------------- registering
def registered_version(client: Any, name: str, cand: Candidate) -> Any | None:
    """The existing version of ``name`` that holds this run's logged model, if any."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}' and run_id='{cand.run_id}'")
    except MlflowException:
        return None
    mine = [v for v in versions if v.source in (f"models:/{cand.model_id}", f"runs:/{cand.run_id}/{MODEL_NAME}")]
    return max(mine or versions, key=lambda v: int(v.version), default=None)


def register(client: Any, name: str, cand: Candidate) -> Any:
    """Create ``name`` if needed and a new version pointing at the candidate's logged model."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="hierseg models; pick one with an alias (champion)")
    return client.create_model_version(
        name, source=f"models:/{cand.model_id}", run_id=cand.run_id, model_id=cand.model_id
    )


def set_alias_to_version(client: Any, name: str, alias: str, version: str) -> Any:
    """Point ``alias`` at an existing version (``--version``); the error lists versions that exist."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version(name, version)
    except MlflowException:
        try:
            have = _versions_text(client, name)
        except MlflowException:
            have = "none (no such registered model)"
        raise RegistryError(f"--version {version}: model {name!r} has no such version; versions: {have}") from None
    client.set_registered_model_alias(name, alias, mv.version)
    return mv


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="hierseg promote", description=__doc__.split("\n")[0])
    ap.add_argument("--spec", help="job spec YAML: default tracking URI, experiment and registered model")
    ap.add_argument("--tracking-uri", help="MLflow store (default: the spec's, else $MLFLOW_TRACKING_URI)")
    ap.add_argument("--experiment", action="append", default=[], help="experiment name (repeatable)")
    ap.add_argument("--sweep", help="sweep id (tag sweep=<id>) or parent run id")
    ap.add_argument("--run", action="append", default=[], help="run id or run name (repeatable)")
    ap.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="required run tag (repeatable)")
    ap.add_argument("--status", action="append", default=None, help="run status to accept (default FINISHED)")
    ap.add_argument("--metric", default=None,
                    help=f"metric to rank by (default: the spec's run.best_metric, else {DEFAULT_METRIC})")  # fmt: skip
    ap.add_argument("--mode", choices=["max", "min"], default="max", help="max: higher is better")
    ap.add_argument("--name", help="registered model name (default: the spec's tracking.registered_model)")
    ap.add_argument("--alias", default="champion", help="alias to point at the winner (default champion)")
    ap.add_argument("--version", help="skip ranking: point the alias at this existing version")
    ap.add_argument("--dry-run", action="store_true", help="print what would happen, change nothing")
    args = ap.parse_args(argv)
    args.status = args.status or ["FINISHED"]
    return args


def _default_metric(args: argparse.Namespace) -> None:
    if args.metric is None:
        args.metric = DEFAULT_METRIC


def _apply_spec(args: argparse.Namespace) -> None:
    if not args.spec:
        return
    from hierseg.spec import load_spec

    spec = load_spec(args.spec)
    uri = spec.tracking.uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).absolute())
    args.tracking_uri = args.tracking_uri or uri
    args.experiment = args.experiment or [spec.tracking.experiment]
    args.name = args.name or spec.tracking.registered_model
    if args.metric is None:
        args.metric, args.mode = spec.run.best_metric, spec.run.best_mode


def promote(args: argparse.Namespace) -> int:
    """Rank candidates, print the table, register the winner if needed and set the alias."""
    client = _client(args.tracking_uri)
    if not args.name:
        raise RegistryError("no registered model name: pass --name NAME (or --spec with tracking.registered_model)")
    if args.version:
        if args.dry_run:
            print(f"dry run: would point {args.name}@{args.alias} at version {args.version}")
            return 0
        mv = set_alias_to_version(client, args.name, args.alias, args.version)
        print(f"promoted: models:/{args.name}@{args.alias} -> version {mv.version} (run {mv.run_id})")
        return 0
    runs = find_runs(client, args)
    cands = with_models(client, runs)
    if not cands:
        where = f"sweep {args.sweep!r}" if args.sweep else f"experiment(s) {args.experiment or 'all'}"
        raise RegistryError(
            f"no candidates in {where}: {len(runs)} run(s) with status {'/'.join(args.status)} and the given "
            "tags/runs, none of which logged a model; train to the end (the best checkpoint is logged then), "
            "or relax --status/--tag/--run"
        )
    for c in cands:
        c.value = metric_value(client, c, args.metric)
    ranked = rank(cands, args.metric, args.mode)
    if not ranked:
        have = sorted({k for c in cands for k in c.run.data.metrics})
        raise RegistryError(f"--metric {args.metric!r} was logged by none of the {len(cands)} candidates; "
                            f"metrics that exist: {', '.join(have) or 'none'}")  # fmt: skip
    print(table(ranked + [c for c in cands if c not in ranked], args.metric))
    return _register_winner(client, args, ranked[0])


def _register_winner(client: Any, args: argparse.Namespace, best: Candidate) -> int:
    existing = registered_version(client, args.name, best)
    what = f"run {best.run_id} ({best.run.info.run_name}, {args.metric}={best.value:.4f})"
    if args.dry_run:
        step = f"reuse version {existing.version}" if existing else "register a new version"
        print(f"dry run: best is {what}; would {step} of {args.name!r} and set alias @{args.alias}")
        return 0
    mv = existing or register(client, args.name, best)
    client.set_registered_model_alias(args.name, args.alias, mv.version)
    note = "existing" if existing else "new"
    print(f"promoted: models:/{args.name}@{args.alias} -> version {mv.version} ({note}) = {what}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        _apply_spec(args)
        _default_metric(args)
        return promote(args)
    except (RegistryError, ValueError) as e:
        print(f"hierseg promote: {e}", file=sys.stderr)
        return 2
