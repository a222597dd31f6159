"""MLflow "models from code" entry: the pyfunc of a hierseg checkpoint (no pickled Python objects)."""

from __future__ import annotations

import mlflow
import mlflow.pyfunc
import numpy as np
import torch

from hierseg.pyfunc import CHECKPOINT_ARTIFACT, model_from_checkpoint


class HiersegPyfunc(mlflow.pyfunc.PythonModel):
    """Input: float32 images ``[N, H, W]`` or ``[N, C, H, W]`` in [0, 1]. Output: fine labels ``[N, H, W]``."""

    def load_context(self, context):
        self.model, self.spec = model_from_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])
        self.hierarchy = self.spec.hierarchy.build()

    def predict(self, context, model_input, params=None):
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        if x.dim() == 3:
            x = x.unsqueeze(1)
        with torch.no_grad():
            logits_fine, _ = self.model(x)
        return logits_fine.argmax(1).to(torch.int16).numpy()


mlflow.models.set_model(HiersegPyfunc())
