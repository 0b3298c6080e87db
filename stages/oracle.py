"""oracle: the EfficientNet-B0 that judges class fidelity, trained on every real train-side image (train + reserve)."""

import sys

from pipeline.core.cli import stage_main


def oracle(params):
    # Imported here: with compute.processes > 1 this process only launches the ranks (pipeline/core/launch.py).
    from pipeline.classifier.oracle import train_oracle

    return train_oracle(params)


if __name__ == "__main__":
    sys.exit(stage_main("oracle", oracle, several_processes=True))
