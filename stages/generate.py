"""generate@<class>: sample the class's synthetic images with a per-image seed and a manifest."""

import sys

from pipeline.core.cli import stage_main


def generate(params, class_code):
    # Imported here: with compute.processes > 1 this process only launches the ranks (pipeline/core/launch.py).
    from pipeline.diffusion.generate import generate_class

    return generate_class(params, class_code)


if __name__ == "__main__":
    sys.exit(stage_main("generate", generate, item="class_code", several_processes=True))
