"""generate_base@<class>: the base_only control's images, from the base model with the class prompt, no class weights."""

import sys
from functools import partial

from pipeline.cli import run_stage
from pipeline.diffusion.generate import generate_class

if __name__ == "__main__":
    sys.exit(run_stage("generate_base", partial(generate_class, base_only=True), item="class_code"))
