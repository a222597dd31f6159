"""``hierseg promote`` against a real MLflow SQLite store: ranking, registering, aliases, errors.

Why real MLflow: the registry's behaviour (logged models, versions, aliases) is the contract; mocks
would only test our assumptions about it.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from tests.registry_helpers import EXPERIMENT, MODEL, promote_champion, trained

pytestmark = pytest.mark.timeout(300)


def _client():
    from mlflow.tracking import MlflowClient

    uri = trained().uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _best_metric(run_id: str) -> float:
    from hierseg.train.checkpoint import load_state

    t = trained()
    return float(load_state(t.checkpoints[t.run_ids.index(run_id)])["best_metrics"]["val/fine/miou"])


def _promote(*args: str) -> int:
    from hierseg.registry import main

    return main(["--tracking-uri", trained().uri, "--experiment", EXPERIMENT, *args])


def test_dry_run_changes_nothing(capsys) -> None:
    assert _promote("--name", "dry-model", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "loss.lambda_coarse" in out and "would register a new version" in out
    assert not _client().search_registered_models(filter_string="name='dry-model'")


def test_promote_picks_best_and_sets_alias(capsys) -> None:
    uri = promote_champion()
    client, t = _client(), trained()
    mv = client.get_model_version_by_alias(MODEL, "champion")
    values = {r: _best_metric(r) for r in t.run_ids}
    assert mv.run_id in t.run_ids and values[mv.run_id] == max(values.values())
    out = capsys.readouterr().out
    assert all(r in out for r in t.run_ids), "table lists both candidates"
    # promoting again reuses the version instead of registering a duplicate
    assert promote_champion() == uri
    assert len(client.search_model_versions(f"name='{MODEL}'")) == 1


def test_promote_min_mode_and_other_metric() -> None:
    client, t = _client(), trained()
    assert _promote("--name", MODEL, "--alias", "lowest-loss", "--metric", "train/loss_fine", "--mode", "min") == 0
    mv = client.get_model_version_by_alias(MODEL, "lowest-loss")
    losses = {r: client.get_run(r).data.metrics["train/loss_fine"] for r in t.run_ids}
    assert losses[mv.run_id] == min(losses.values())


def test_named_runs_and_version(capsys) -> None:
    t = trained()
    assert _promote("--name", MODEL, "--alias", "first", "--run", "lc0.0") == 0
    assert _client().get_model_version_by_alias(MODEL, "first").run_id == t.run_ids[0]
    assert _promote("--name", MODEL, "--alias", "pinned", "--version", "1") == 0


def test_load_back_through_alias_matches_checkpoint() -> None:
    from hierseg.serve.infer import load_model
    from hierseg.serve.pyfunc import model_from_checkpoint

    uri, t = promote_champion(), trained()
    model, spec = load_model(uri, t.uri)
    run_id = _client().get_model_version_by_alias(MODEL, "champion").run_id
    ref, _ = model_from_checkpoint(t.checkpoints[t.run_ids.index(run_id)])
    x = torch.rand(1, 1, 48, 40)
    with torch.no_grad():
        assert torch.equal(model(x)[0], ref(x)[0])
    assert spec.model.base_channels == 8


def test_pyfunc_predict_uses_tiled_inference() -> None:
    import mlflow

    uri, t = promote_champion(), trained()
    mlflow.set_tracking_uri(t.uri)
    mlflow.set_registry_uri(t.uri)
    pyfunc = mlflow.pyfunc.load_model(uri)
    out = pyfunc.predict(np.random.default_rng(0).random((2, 1, 70, 300), dtype=np.float32))
    assert out.shape == (2, 70, 300) and out.dtype == np.int16 and out.min() >= 0 and out.max() <= 11


# ------------------------------------------------------------------------------------------- errors
def test_error_metric_logged_by_no_run(capsys) -> None:
    assert _promote("--name", MODEL, "--metric", "val/fine/miuo") == 2
    err = capsys.readouterr().err
    assert "'val/fine/miuo' was logged by none" in err and "val/fine/miou" in err


def test_error_no_finished_candidates(capsys) -> None:
    assert _promote("--name", MODEL, "--tag", "sweep=does-not-exist") == 2
    assert "no candidates" in capsys.readouterr().err
    assert _promote("--name", MODEL, "--status", "KILLED") == 2


def test_error_unknown_version_alias_model(capsys) -> None:
    from hierseg.registry import RegistryError, resolve_model_uri

    promote_champion()
    assert _promote("--name", MODEL, "--version", "99") == 2
    assert "versions: 1" in capsys.readouterr().err
    with pytest.raises(RegistryError, match=r"no alias 'nope'; aliases: .*@champion"):
        resolve_model_uri(f"models:/{MODEL}@nope", trained().uri)
    with pytest.raises(RegistryError, match=r"no version 7; versions: 1"):
        resolve_model_uri(f"models:/{MODEL}/7", trained().uri)
    with pytest.raises(RegistryError, match=rf"no registered model 'nope'; registered: .*{MODEL}"):
        resolve_model_uri("models:/nope@champion", trained().uri)


def test_error_unreachable_server(capsys) -> None:
    from hierseg.registry import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["--tracking-uri", f"http://127.0.0.1:{port}", "--name", MODEL]) == 2
    assert "unreachable" in capsys.readouterr().err
    assert main(["--tracking-uri", "sqlite:////nonexistent/x.db", "--name", MODEL]) == 2


def test_promote_default_metric_is_the_spec_default() -> None:
    """promote ranks by the same metric training chooses checkpoints by, unless told otherwise."""
    from hierseg.registry import DEFAULT_METRIC
    from hierseg.spec import RunSpec

    assert RunSpec.model_fields["best_metric"].default == DEFAULT_METRIC
