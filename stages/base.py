"""base: pre-train the embedded tiny SD model, or validate and reference a real checkpoint."""

import sys

from pipeline.core.cli import stage_main
from pipeline.diffusion.base import prepare_base

if __name__ == "__main__":
    sys.exit(stage_main("base", prepare_base))
