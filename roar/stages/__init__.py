"""The pipeline's stages, each a ``run(cfg)`` over a run folder: train, extract, retrain, curves, vog."""
