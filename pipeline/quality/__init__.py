"""Screening of synthetic images before they reach the classifier: quality, memorization, confidence.

- ``features``: embeddings (the baseline classifier's penultimate layer, or Inception when its weights are local),
  on the models' device, and ``feature_space``, where the metrics and the gate compare them
- ``metrics``: FID and KID (torchmetrics), k-NN precision/recall/coverage, on feature tensors
- ``memorization``: nearest fine-tuning image per synthetic image, cosine + SSIM gate
- ``sanity``: which figures are out of range, and why (the ``flags`` of reports/quality.json)
- ``screen``: the `screen` stage body and ``load_kept_synthetic`` for augmented training
"""
