"""finetune@<class>: teach the base model one class under its instance token (diffusion.method: LoRA, DreamBooth,
textual inversion or hypernetwork)."""

import sys

from pipeline.core.cli import stage_main


def finetune(params, class_code):
    # Imported here: with compute.processes > 1 this process only launches the ranks (pipeline/core/launch.py).
    from pipeline.diffusion.finetune import finetune_class

    return finetune_class(params, class_code)


if __name__ == "__main__":
    sys.exit(stage_main("finetune", finetune, item="class_code", several_processes=True))
