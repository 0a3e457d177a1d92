"""Perturbations of images that replace removed pixels."""

from roar.perturb.road import road_impute

__all__ = ["road_impute"]
