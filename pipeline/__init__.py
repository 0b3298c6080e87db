"""lesion-synth: per-class diffusion fine-tuning for skin-lesion augmentation, and the classifier that judges it."""
