"""VoG, Variance of Gradients (Agarwal, D'souza and Hooker, CVPR 2022): which examples are hard.

An example whose input gradient keeps changing across training snapshots sits where the model
is still unsure; VoG summarises that change as one number per example. The ``roar vog`` stage
that computes the gradients is ``roar.stages.vog``.
"""

from roar.vog.scores import class_normalize, default_stages, vog_scores

__all__ = ["class_normalize", "default_stages", "vog_scores"]
