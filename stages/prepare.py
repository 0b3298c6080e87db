"""prepare: validate the HAM10000 folder, split by lesion, sample fine-tune images from train."""

import sys

from pipeline.core.cli import stage_main
from pipeline.data.split import prepare

if __name__ == "__main__":
    sys.exit(stage_main("prepare", prepare))
