"""Training: the base classifier (``train``) and the loop that ROAR/KAR retraining reuses (``fit``)."""

from roar.training.trainer import evaluate, fit, load_run_model, load_trained_model, train

__all__ = ["evaluate", "fit", "load_run_model", "load_trained_model", "train"]
