"""evaluate: every classifier variant on the real test split; metrics, paired bootstrap gain and verdict."""

import sys

from pipeline.classifier.evaluate import evaluate
from pipeline.core.cli import stage_main

if __name__ == "__main__":
    # track=False: evaluate logs its own two runs (one per variant), see pipeline/classifier/evaluate.py.
    sys.exit(stage_main("evaluate", evaluate, track=False))
