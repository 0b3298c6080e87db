"""train@<variant>: EfficientNet-B0 on real train images (baseline) or real + synthetic (augmented)."""

import sys

from pipeline.classifier.train import train_variant
from pipeline.cli import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("train", train_variant, item="variant"))
