"""MLflow "models from code" entry: the pyfunc of a hierseg checkpoint (no pickled Python objects).

``predict`` goes through :func:`hierseg.infer.predict_image` (tiles, blending, hierarchy-consistent
labels), so ``mlflow.pyfunc.load_model(...).predict`` gives the same fine labels as ``hierseg predict``
for images of any size, not only the training patch size.
"""

from __future__ import annotations

import mlflow
import mlflow.pyfunc
import numpy as np

from hierseg.pyfunc import CHECKPOINT_ARTIFACT, model_from_checkpoint


class HiersegPyfunc(mlflow.pyfunc.PythonModel):
    """Input: float32 images ``[N, H, W]`` or ``[N, C, H, W]`` in [0, 1]. Output: fine labels ``[N, H, W]`` int16."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.model, self.spec = model_from_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])
        self.hierarchy = self.spec.hierarchy.build()

    # np.ndarray hints: MLflow validates the input type and keeps the explicit tensor signature we log
    # (it infers no signature from an ndarray hint), instead of warning that the method has no hints.
    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: np.ndarray, params: dict | None = None
    ) -> np.ndarray:
        from hierseg.infer import predict_image

        x = np.asarray(model_input, dtype=np.float32)
        if x.ndim == 2:
            x = x[None]
        labels = [predict_image(self.model, img, hierarchy=self.hierarchy)["fine_labels"] for img in x]
        return np.stack(labels).astype(np.int16)


mlflow.models.set_model(HiersegPyfunc())
