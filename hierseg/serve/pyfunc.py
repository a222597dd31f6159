"""The logged model: a checkpoint (weights + resolved spec) wrapped as an MLflow pyfunc.

Weights travel as a ``state_dict`` loaded with ``weights_only=True`` (no pickled modules), so a
registered version carries everything inference needs: weights, resolved spec, hierarchy, label
map, input normalisation and patch size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hierseg.labels import FINE_CLASSES
from hierseg.model import UNet, build_model
from hierseg.spec import JobSpec, validate_spec

CHECKPOINT_ARTIFACT = "checkpoint"
_EXAMPLE_SIDE = 32  # small: MLflow runs the model on the example while logging


def model_from_state(state: dict[str, Any]) -> tuple[UNet, JobSpec]:
    """Rebuild the model of a checkpoint state (as saved by training) in eval mode on CPU."""
    spec = validate_spec(state["spec"], "checkpoint")
    model = build_model(spec.model, spec.hierarchy.build(), source_names=spec.data.source_names())
    model.load_state_dict(state["model"])
    return model.eval(), spec


def model_from_checkpoint(path: str | Path) -> tuple[UNet, JobSpec]:
    from hierseg.checkpoint_io import load_state

    return model_from_state(load_state(path))


def model_card(spec: JobSpec, state: dict[str, Any]) -> dict[str, Any]:
    """What inference needs besides the weights; stored next to the checkpoint in the model."""
    return {
        "fine_classes": list(FINE_CLASSES),
        "hierarchy": spec.hierarchy.build().to_config(),
        "label_map": state.get("label_map"),
        "input": {"channels": spec.model.in_channels, "normalization": state.get("normalization")},
        "patch_size": state.get("patch_size"),
        "norm_sources": spec.data.source_names() if spec.model.norm == "source_batch" else None,
        "step": int(state["step"]),
        "metrics": state.get("best_metrics", {}),
    }


def input_shape_and_example(spec: JobSpec) -> tuple[tuple[int, ...], np.ndarray]:
    """The pyfunc's input tensor shape (``-1``: any size) and its all-zero input example, by ``model.dims``.

    2D: images ``[N, C, H, W]``. 3D: one volume ``[D, H, W]`` (``[D, C, H, W]`` for a multi-channel model, as
    :func:`hierseg.serve.infer.block_input` takes slices). Sides stay variable because predict slides windows
    (``hierseg predict``'s, cut to a smaller input). The example is small, each side at most
    ``_EXAMPLE_SIDE`` (a 3D one: the training patch so capped), because MLflow stores it and predicts on it
    once while logging.
    """
    channels = spec.model.in_channels
    if spec.model.dims == 2:
        return (-1, channels, -1, -1), np.zeros((1, channels, _EXAMPLE_SIDE, _EXAMPLE_SIDE), np.float32)
    depth, height, width = (min(int(side), _EXAMPLE_SIDE) for side in spec.data.patch_size)
    if channels == 1:
        return (-1, -1, -1), np.zeros((depth, height, width), np.float32)
    return (-1, channels, -1, -1), np.zeros((depth, channels, height, width), np.float32)


def log_checkpoint_model(uri: str, run_id: str, checkpoint: Path, spec: JobSpec) -> str | None:
    """Log ``checkpoint`` as the run's model; register it if ``tracking.registered_model`` is set.

    Returns the model URI (``models:/NAME/VERSION`` when registered, else ``runs:/ID/model``).
    """
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    from hierseg import __version__
    from hierseg.checkpoint_io import STATE_FILE, load_state

    state = load_state(checkpoint)
    card = model_card(spec, state)
    input_shape, example = input_shape_and_example(spec)
    per_source = spec.model.norm == "source_batch"
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), input_shape)]),
        outputs=Schema([TensorSpec(np.dtype(np.int16), (-1, -1, -1))]),  # [N, H, W] in 2D, [D, H, W] in 3D
        # predict(..., params={"source": NAME}); no default source: a wrong one gives a plausible wrong answer
        params=ParamSchema([ParamSpec("source", "string", "")]) if per_source else None,
    )
    if per_source:
        example = None  # MLflow predicts on the example while logging, and that needs a source
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("mlflow_model.py")),  # models-from-code: nothing pickled
            artifacts={CHECKPOINT_ARTIFACT: str(Path(checkpoint) / STATE_FILE)},
            signature=signature,
            input_example=example,
            pip_requirements=[f"hierseg=={__version__}", f"torch>={torch.__version__.split('+')[0]}"],
            metadata={"hierseg": card},
        )
        mlflow.log_text(json.dumps(card, indent=1), "model_card.json")
    if not spec.tracking.registered_model:
        return info.model_uri
    version = mlflow.register_model(info.model_uri, spec.tracking.registered_model)
    return f"models:/{version.name}/{version.version}"
