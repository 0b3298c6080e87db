"""generate_base: the base_only control's images for every class, from the base model with the class prompt.

One stage and one loaded pipeline for all classes: each class costs seconds of sampling but a stage process costs
seconds of imports and a pipeline load, and the images depend only on the base model, not on the fine-tuning method, so a method change never reruns them."""

import sys

from pipeline.core.cli import stage_main


def generate_base(params):
    # Imported here: with compute.processes > 1 this process only launches the ranks (pipeline/core/launch.py).
    from pipeline.diffusion.generate import generate_class, generation_pipeline

    loaded = generation_pipeline(params, params.data.classes[0], base_only=True)  # the same model for every class
    for class_code in params.data.classes:
        generate_class(params, class_code, base_only=True, loaded=loaded)


if __name__ == "__main__":
    sys.exit(stage_main("generate_base", generate_base, several_processes=True))
