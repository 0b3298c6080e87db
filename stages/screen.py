"""screen: quality metrics, memorization gate and confidence filter of the synthetic images (pipeline/quality)."""

import sys

from pipeline.cli import run_stage
from pipeline.quality.screen import screen

if __name__ == "__main__":
    sys.exit(run_stage("screen", screen))
