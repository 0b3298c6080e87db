"""fidelity: the oracle's verdict on each class's synthetic images (fine-tuned and base-only), in reports/fidelity.json."""

import sys

from pipeline.classifier.oracle import score_fidelity
from pipeline.cli import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("fidelity", score_fidelity))
