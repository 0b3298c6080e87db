"""fidelity: the oracle's verdict on each class's synthetic images (fine-tuned and base-only), in reports/fidelity.json."""

import sys

from pipeline.classifier.oracle import score_fidelity
from pipeline.core.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("fidelity", score_fidelity))
