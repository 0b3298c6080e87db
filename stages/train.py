"""train@<variant>: EfficientNet-B0 on real train images (baseline), plus synthetic ones (augmented), base-model ones
(base_only) or reserve real ones (real_ceiling)."""

import sys

from pipeline.core.cli import stage_main


def train(params, variant):
    # Imported here: with compute.processes > 1 this process only launches the ranks (pipeline/core/launch.py).
    from pipeline.classifier.train import train_variant

    return train_variant(params, variant)


if __name__ == "__main__":
    sys.exit(stage_main("train", train, item="variant", several_processes=True))
