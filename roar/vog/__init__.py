"""VoG, Variance of Gradients (Agarwal, D'souza and Hooker, CVPR 2022): which examples are hard.

An example whose input gradient keeps changing across training snapshots sits where the model
is still unsure; VoG summarises that change as one number per example.
"""

from roar.vog.scores import class_normalize, default_stages, vog_scores

__all__ = ["class_normalize", "default_stages", "run", "vog_scores"]


def __getattr__(name: str):
    """``roar.vog.run`` (the ``roar vog`` stage), imported on first use: the scores alone need only numpy."""
    if name == "run":
        from roar.vog.stage import run

        return run
    raise AttributeError(f"module 'roar.vog' has no attribute '{name}'")
