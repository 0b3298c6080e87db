"""report: reports/summary.md, the one page a person reads."""

import sys

from pipeline.cli import run_stage
from pipeline.report import report

if __name__ == "__main__":
    sys.exit(run_stage("report", report))
