"""finetune@<class>: teach the base model one class under its instance token (LoRA / DreamBooth / textual inversion; DESIGN.md)."""

import sys

from pipeline.cli import run_stage
from pipeline.diffusion.finetune import finetune_class

if __name__ == "__main__":
    sys.exit(run_stage("finetune", finetune_class, item="class_code"))
