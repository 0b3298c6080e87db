"""controlnet: one lesion-mask ControlNet for every selected class (diffusion.control: mask; with none, a marker)."""

import sys

from pipeline.core.atomic import atomic_dir, write_json
from pipeline.core.cli import is_main_process, stage_main
from pipeline.core.paths import CONTROLNET_DIR, workspace_root


def controlnet(params):
    if params.diffusion.control == "none":  # the marker that generation checks: no torch or diffusers to load
        if is_main_process():  # every rank of a launched stage gets here; one writes
            with atomic_dir(workspace_root() / CONTROLNET_DIR) as temp:
                write_json(temp / "meta.json", {"control": "none"})
        return
    # Imported here: with compute.processes > 1 this process only launches the ranks (pipeline/core/launch.py).
    from pipeline.diffusion.controlnet import train_controlnet

    return train_controlnet(params)


if __name__ == "__main__":
    sys.exit(stage_main("controlnet", controlnet, several_processes=True))
