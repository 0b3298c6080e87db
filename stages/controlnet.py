"""controlnet: one lesion-mask ControlNet for every selected class (diffusion.control: mask; with none, a marker)."""

import sys

from pipeline.cli import stage_main


def controlnet(params):
    # Imported here: with compute.processes > 1 this process only launches the ranks (pipeline/launch.py).
    from pipeline.diffusion.controlnet import train_controlnet

    return train_controlnet(params)


if __name__ == "__main__":
    sys.exit(stage_main("controlnet", controlnet, several_processes=True))
