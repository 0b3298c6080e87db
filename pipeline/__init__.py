"""lesion-synth: per-class diffusion fine-tuning for skin-lesion augmentation, and the classifier that judges it."""

import os

# How idle OpenMP threads wait for work (GNU OpenMP, what pip's torch ships): spin 1000 times, then sleep.
# Measured on 2 cores, 2 torch threads: libgomp's default (300,000 spins) made a classifier step 14x slower when
# another process used the cores; never spinning (OMP_WAIT_POLICY=PASSIVE) made an idle box's tiny-UNet LoRA step
# 2.5x and EfficientNet-B0 step 1.5x slower than spinning. 1000 spins keeps most of the idle-box speed; parallel
# sweeps set PASSIVE (pipeline/sweep.py). It must be set before torch loads, which is why it lives here (every
# stage imports this package first); OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment win.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
