"""Serving: prediction, stack IO, evaluation and the logged MLflow model; never imports hierseg.train."""
