"""evaluate: both classifiers on the real test split; metrics, paired bootstrap gain and verdict."""

import os
import sys

# Idle OpenMP threads sleep instead of spinning: on a busy 2-core box a training step measured 14x faster
# (25 s -> 1.8 s per batch); must be set before torch loads. An explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pipeline.classifier.evaluate import evaluate  # noqa: E402
from pipeline.cli import run_stage  # noqa: E402

if __name__ == "__main__":
    # track=False: evaluate logs its own two runs (one per variant), see pipeline/classifier/evaluate.py.
    sys.exit(run_stage("evaluate", evaluate, track=False))
