"""oracle: the EfficientNet-B0 that judges class fidelity, trained on every real train-side image (train + reserve)."""

import sys

from pipeline.classifier.oracle import train_oracle
from pipeline.cli import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("oracle", train_oracle))
