"""Screening of synthetic images before they reach the classifier: quality, memorization, confidence.

- ``features``: embeddings (the baseline classifier's penultimate layer, or Inception when its weights are local)
- ``metrics``: FID, KID, k-NN precision/recall/coverage on feature arrays (numpy only)
- ``memorization``: nearest fine-tuning image per synthetic image, cosine + SSIM gate
- ``screen``: the `screen` stage body and ``load_kept_synthetic`` for augmented training
"""
