"""generate@<class>: sample the class's synthetic images with a per-image seed and a manifest (DESIGN.md)."""

import sys

from pipeline.cli import run_stage
from pipeline.diffusion.generate import generate_class

if __name__ == "__main__":
    sys.exit(run_stage("generate", generate_class, item="class_code"))
