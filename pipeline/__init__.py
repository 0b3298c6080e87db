"""lesion-synth: per-class diffusion fine-tuning for skin-lesion augmentation, and the classifier that judges it."""

import os

# Idle OpenMP threads sleep instead of spinning. On a busy 2-core box one classifier step measured
# 14x faster (25 s -> 1.8 s per batch of 64). It must be set before torch loads, which is why it lives
# here (every stage imports this package first); an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
