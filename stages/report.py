"""report: reports/summary.md, the one page a person reads."""

import sys

from pipeline.core.cli import stage_main
from pipeline.report import report

if __name__ == "__main__":
    sys.exit(stage_main("report", report))
