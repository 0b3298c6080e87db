"""screen: quality metrics, memorization gate and confidence filter of the synthetic images (pipeline/quality)."""

import sys

from pipeline.core.cli import stage_main
from pipeline.quality.screen import screen

if __name__ == "__main__":
    sys.exit(stage_main("screen", screen))
