"""Training a classifier: the loop (``fit``) that the base model and ROAR/KAR retraining share."""

from roar.training.config import TrainingConfig
from roar.training.trainer import evaluate, fit, load_trained_model

__all__ = ["TrainingConfig", "evaluate", "fit", "load_trained_model"]
