"""demo_data: draw the embedded demo set in HAM10000's release layout, or mark it skipped for real data."""

import sys

from pipeline.core.cli import stage_main
from pipeline.data.demo import make_demo

if __name__ == "__main__":
    sys.exit(stage_main("demo_data", make_demo))
