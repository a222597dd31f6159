"""MLflow "models from code" entry: the pyfunc of a hierseg checkpoint (no pickled Python objects).

``predict`` goes through ``hierseg predict``'s own path with its defaults for the model
(:func:`hierseg.serve.infer.default_options`): a 2D model's images through
:func:`hierseg.serve.infer.predict_image` (tiles, blending, hierarchy-consistent labels), a 3D model's volume
through :func:`hierseg.serve.infer.predict_volume` (blended ``[z, y, x]`` windows of the training patch). So
``mlflow.pyfunc.load_model(...).predict`` gives the same fine labels as ``hierseg predict`` for inputs of any
size, not only the training patch size.
"""

from __future__ import annotations

import mlflow
import mlflow.pyfunc
import numpy as np

from hierseg.serve.pyfunc import CHECKPOINT_ARTIFACT


class HiersegPyfunc(mlflow.pyfunc.PythonModel):
    """Input (raw values as in the stack, any range; normalised as the model was trained): a 2D model's images
    ``[N, H, W]`` or ``[N, C, H, W]``, a 3D model's volume ``[D, H, W]`` (``[D, C, H, W]`` for a multi-channel
    one). Output: fine labels int16, ``[N, H, W]`` or ``[D, H, W]``, decoded as ``hierseg predict`` does."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from hierseg.serve.infer import default_options, load_predictor

        self.predictor = load_predictor(context.artifacts[CHECKPOINT_ARTIFACT])
        # a model.norm source_batch model takes its source per call (params={"source": NAME})
        self.options = None if getattr(self.predictor.model, "source_names", ()) else default_options(self.predictor)

    # np.ndarray hints: MLflow validates the input type and keeps the explicit tensor signature we log
    # (it infers no signature from an ndarray hint), instead of warning that the method has no hints.
    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: np.ndarray, params: dict | None = None
    ) -> np.ndarray:
        from hierseg.serve.infer import default_options

        x = np.asarray(model_input, dtype=np.float32)
        options = self.options or default_options(self.predictor, source=(params or {}).get("source"))
        if self.predictor.dims == 3:
            return self._predict_volume(x, options)
        if x.ndim == 2:
            x = x[None]
        labels = [self.predictor.predict(img, options)["fine_labels"] for img in x]
        return np.stack(labels).astype(np.int16)

    def _predict_volume(self, volume: np.ndarray, options) -> np.ndarray:
        """A 3D model's fine labels of one volume, slice by slice as ``hierseg predict`` writes them."""
        from hierseg.serve.infer import PredictError, in_channels_of, predict_volume

        channels = in_channels_of(self.predictor.model)
        if volume.ndim != (3 if channels == 1 else 4):
            want = "[D, H, W]" if channels == 1 else f"[D, {channels}, H, W]"
            raise PredictError(f"model_input of shape {list(volume.shape)}: a 3D model with {channels} input "
                               f"channel(s) predicts one volume {want}; pass volumes one at a time")  # fmt: skip
        labels = [out["fine_labels"] for out in predict_volume(self.predictor, volume, options)]
        return np.stack(labels).astype(np.int16)


mlflow.models.set_model(HiersegPyfunc())
