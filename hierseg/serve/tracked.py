"""A blockwise prediction recorded as an MLflow run beside the model it used (``hierseg predict --ray --track``).

Why: a lab predicts many volumes with a few models, and months later asks which model made which
volume. The run goes into the experiment of the model's training run (``runs:/ID/...``, or the run a
``models:/`` version was logged from), tagged with that run's id, the model URI and the weights digest;
a model from no run (a checkpoint folder, a version registered from a path) goes into experiment
:data:`EXPERIMENT`. The run is created before the first block, so it shows as RUNNING while the
volume is predicted, and ends FINISHED with the block counts and rates, or FAILED.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hierseg.serve.infer import PredictError

EXPERIMENT = "hierseg-predict"
"""Experiment of a tracked prediction whose model comes from no MLflow run."""
PARAMS = ("input", "block", "tile", "overlap", "batch", "decode", "device", "tta", "source")
"""Settings logged as params (all of them, the store's record, are in the run's ``blockwise.json``)."""


def _model_run(model: str, tracking_uri: str) -> Any | None:
    """The MLflow run ``model`` was logged from, or None (a checkpoint path, a version registered from a path)."""
    from hierseg.registry import _client, resolve_model_uri

    if not model.startswith(("models:/", "runs:/")):
        _client(tracking_uri)  # the store must answer before any block is predicted
        return None
    found = resolve_model_uri(model, tracking_uri)  # one-line errors for unknown names, versions, aliases
    if model.startswith("runs:/"):
        return found
    return _client(tracking_uri).get_run(found.run_id) if found.run_id else None


class PredictionRun:
    """The MLflow run of one ``predict --ray --track`` command: :meth:`start`, then :meth:`finish`."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri, self.run_id = tracking_uri, run_id

    @classmethod
    def start(
        cls, model: str, tracking_uri: str | None, output: str, record: dict[str, Any], workers: int
    ) -> PredictionRun:
        """Create the run (RUNNING) with the settings; a store that does not answer fails before any block."""
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        from hierseg import __version__
        from hierseg.tracking import experiment_id

        if not tracking_uri:
            raise PredictError("--track records the run in MLflow: give --tracking-uri (or set MLFLOW_TRACKING_URI)")
        model_run = _model_run(model, tracking_uri)
        client = MlflowClient(tracking_uri=tracking_uri)
        exp = model_run.info.experiment_id if model_run else experiment_id(client, EXPERIMENT, tracking_uri)
        tags = {
            "hierseg.kind": "predict",
            "hierseg.model": model,
            "hierseg.weights_sha256": record["weights_sha256"],
            "hierseg.version": __version__,
            **({"hierseg.model_run_id": model_run.info.run_id} if model_run else {}),
        }
        run_id = client.create_run(exp, run_name=f"predict {Path(output).name}", tags=tags).info.run_id
        settings = {**{k: record[k] for k in PARAMS if k in record}, "output": output, "ray_workers": workers}
        params = [Param(k, _param(v)) for k, v in settings.items()]
        client.log_batch(run_id, params=params)
        client.log_dict(run_id, record, "blockwise.json")
        return cls(tracking_uri, run_id)

    def finish(self, result: Any | None) -> None:
        """Log the counts and rates of ``result`` (a :class:`~hierseg.serve.blockwise.BlockwiseResult`) and end
        the run FINISHED; ``None``: the prediction failed, the run ends FAILED."""
        from mlflow.tracking import MlflowClient

        from hierseg.tracking import end_run

        if result is None:
            end_run(self.tracking_uri, self.run_id, "FAILED")
            return
        seconds = max(result.seconds, 1e-9)
        metrics = {
            "blocks": result.blocks,
            "blocks_computed": result.computed,
            "blocks_skipped": result.skipped,
            "voxels": result.voxels,
            "seconds": result.seconds,
            "blocks_per_s": result.computed / seconds if result.computed else 0.0,
            "voxels_per_s": result.voxels / seconds if result.computed else 0.0,
        }
        try:
            client = MlflowClient(tracking_uri=self.tracking_uri)
            for name, value in metrics.items():
                client.log_metric(self.run_id, name, float(value))
        except Exception as e:  # the volume is complete; only its record is not
            end_run(self.tracking_uri, self.run_id, "FAILED")
            raise PredictError(
                f"the prediction is complete, but its MLflow run {self.run_id} could not be updated "
                f"({type(e).__name__}: {e}); rerun the same command to record it (done blocks are skipped)"
            ) from None
        end_run(self.tracking_uri, self.run_id, "FINISHED")


def _param(value: Any) -> str:
    """As the flags take it: ``2,64,72`` for a shape."""
    return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
