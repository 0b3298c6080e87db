"""generate_base@<class>: the base_only control's images, from the base model with the class prompt, no class weights."""

import sys

from pipeline.cli import stage_main


def generate_base(params, class_code):
    # Imported here: with compute.processes > 1 this process only launches the ranks (pipeline/launch.py).
    from pipeline.diffusion.generate import generate_class

    return generate_class(params, class_code, base_only=True)


if __name__ == "__main__":
    sys.exit(stage_main("generate_base", generate_base, item="class_code", several_processes=True))
