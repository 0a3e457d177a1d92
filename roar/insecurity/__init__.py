"""Deliberative explanations (Wang & Vasconcelos, NeurIPS 2019): where a network is torn between two classes.

* ``maps``: class maps of the top predicted classes and difficulty maps of a score (``cs``,
  ``entropy``, the hardness predictor ``hp``), at a feature layer, in three variants (gradient, IG,
  2ndG), on the layer engine of ``roar.attribution.layer``;
* ``hardness``: the hardness predictor, a head on the classifier's features, and its cross-fitting;
* ``ambiguity``: the ambiguous class pairs of an image and their insecurity maps A_a ⊙ A_b ⊙ D;
* ``evaluation``: precision and recall of binarised maps against a ground-truth region, and the
  area under the precision-recall curve.

``roar insecurity`` (``roar.stages.insecurity``) runs them over a dataset split.
"""
