"""prepare: validate the HAM10000 folder, split by lesion, sample fine-tune images from train (DESIGN.md)."""

import sys

from pipeline.cli import run_stage
from pipeline.data.split import prepare

if __name__ == "__main__":
    sys.exit(run_stage("prepare", prepare))
