"""MLflow "models from code" entry: the pyfunc of a hierseg checkpoint (no pickled Python objects).

``predict`` goes through :func:`hierseg.serve.infer.predict_image` (tiles, blending, hierarchy-consistent
labels), so ``mlflow.pyfunc.load_model(...).predict`` gives the same fine labels as ``hierseg predict``
for images of any size, not only the training patch size.
"""

from __future__ import annotations

import mlflow
import mlflow.pyfunc
import numpy as np

from hierseg.serve.pyfunc import CHECKPOINT_ARTIFACT


class HiersegPyfunc(mlflow.pyfunc.PythonModel):
    """Input: raw images ``[N, H, W]`` or ``[N, C, H, W]`` (pixel values as in the stack, any range; normalised
    as the model was trained). Output: fine labels ``[N, H, W]`` int16, decoded as ``hierseg predict`` does."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from hierseg.serve.infer import default_options, load_predictor

        self.predictor = load_predictor(context.artifacts[CHECKPOINT_ARTIFACT])
        self.options = default_options(self.predictor)

    # np.ndarray hints: MLflow validates the input type and keeps the explicit tensor signature we log
    # (it infers no signature from an ndarray hint), instead of warning that the method has no hints.
    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: np.ndarray, params: dict | None = None
    ) -> np.ndarray:
        x = np.asarray(model_input, dtype=np.float32)
        if x.ndim == 2:
            x = x[None]
        labels = [self.predictor.predict(img, self.options)["fine_labels"] for img in x]
        return np.stack(labels).astype(np.int16)


mlflow.models.set_model(HiersegPyfunc())
