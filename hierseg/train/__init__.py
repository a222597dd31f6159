"""Training service: one per-worker loop (:func:`train_worker`) for the Ray, torchrun and local launchers."""
