"""Typed, validated view of params.yaml (which documents each key): the only way stages read configuration. Every
section forbids unknown keys, so a typo fails with one line naming the key instead of using a default."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, get_args

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from pipeline.core.errors import PipelineError, require_file

# HAM10000's seven diagnosis codes, with the names used in prompts and reports.
CLASS_NAMES: dict[str, str] = {
    "akiec": "actinic keratosis",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}

ClassCode = Literal[tuple(CLASS_NAMES)]  # one of the seven codes above


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _distinct(seeds: list[int]) -> list[int]:
    if len(set(seeds)) != len(seeds):
        raise ValueError("seeds must be distinct")
    return seeds


Seeds = Annotated[list[int], Field(min_length=1), AfterValidator(_distinct)]


class SplitParams(_Section):
    val: float = Field(0.2, gt=0, lt=1)
    test: float = Field(0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _leaves_train(self) -> "SplitParams":
        if self.val + self.test >= 1:
            raise ValueError(f"val + test must be < 1 so that a train split remains, got {self.val} + {self.test}")
        return self


class DataParams(_Section):
    source: str = "demo"  # 'demo' or a path to a HAM10000 / ISIC 2018 Task 3 folder
    classes: list[ClassCode] = Field(default_factory=lambda: ["akiec", "bcc", "df", "mel", "vasc"], min_length=2)
    split: SplitParams = SplitParams()
    finetune_images: int = Field(20, gt=0)
    real_per_class: int | None = Field(None, gt=0)  # cap on classifier-train images per class; the rest is the reserve
    image_size: int = Field(128, gt=0)
    on_bad_image: Literal["error", "skip"] = "error"

    @field_validator("classes")
    @classmethod
    def _distinct_classes(cls, classes: list[str]) -> list[str]:
        dupes = sorted({c for c in classes if classes.count(c) > 1})
        if dupes:
            raise ValueError(f"duplicate class code {dupes[0]!r}")
        return classes

    @property
    def is_demo(self) -> bool:
        return self.source == "demo"


class DemoParams(_Section):
    images: int = Field(2000, gt=0)
    size: int = Field(128, ge=32)
    min_per_class: int = Field(260, gt=0)  # floor on every class's image count (HAM10000 has only ~1% df/vasc)


class LoraParams(_Section):
    rank: int = Field(8, gt=0)
    alpha: float = Field(8, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


class BasePretrainParams(_Section):
    vae_steps: int = Field(1000, ge=0)  # 90% of them on half-size crops (4x cheaper), see pretrain.py
    unet_steps: int = Field(800, ge=0)
    batch: int = Field(16, gt=0)
    vae_lr: float = Field(2e-3, gt=0)
    unet_lr: float = Field(2e-3, gt=0)
    prompt: str = "a dermoscopic image of a skin lesion"


class HypernetworkParams(_Section):
    kind: Literal["encoder_copy", "context_mlp"] = "encoder_copy"
    layer_structure: list[float] = Field(default_factory=lambda: [1.0, 2.0, 1.0])
    activation: Literal["linear", "relu", "gelu", "swish"] = "linear"  # between layers; linear: none (webui default)

    @field_validator("layer_structure")
    @classmethod
    def _ends_at_one(cls, widths: list[float]) -> list[float]:
        if len(widths) < 2 or widths[0] != 1 or widths[-1] != 1 or any(w <= 0 for w in widths):
            raise ValueError(f"layer_structure must start and end with 1 and have widths > 0, got {widths}")
        return widths


class ControlNetParams(_Section):
    steps: int = Field(400, gt=0)
    batch: int = Field(8, gt=0)
    lr: float = Field(1e-4, gt=0)  # diffusers' ControlNet example: 1e-5 for SD 1.5
    conditioning_scale: float = Field(1.0, ge=0)  # at generation: how strongly the mask steers
    shift: float = Field(0.1, ge=0, lt=1)  # conditioning masks: random shift, as a fraction of the side
    scale: float = Field(0.2, ge=0, lt=1)  # ... random scale in 1 ± this
    elastic: float = Field(0.05, ge=0, lt=1)  # ... elastic warp: its mean reach as a fraction of the side


Method = Literal["lora", "dreambooth", "textual_inversion", "hypernetwork"]


class DiffusionParams(_Section):
    base_model: str = "embedded-tiny"  # or a Hub id / local diffusers folder
    method: Method = "lora"
    resolution: int = Field(32, ge=8)
    steps: int = Field(250, gt=0)
    batch: int = Field(4, gt=0)
    lr: float | dict[Method, float] = 1e-4  # one rate for every method, or one per method
    lora: LoraParams = LoraParams()
    hypernetwork: HypernetworkParams = HypernetworkParams()
    control: Literal["none", "mask"] = "none"  # mask: a ControlNet on lesion masks steers every class's generation
    controlnet: ControlNetParams = ControlNetParams()
    prompt: str = "a dermoscopic image of {token} {class_name}"
    instance_tokens: dict[str, str] = Field(default_factory=lambda: {
        "akiec": "zkq", "bcc": "vbx", "bkl": "pqw", "df": "sks", "mel": "ohwx", "nv": "jxv", "vasc": "qzt"})
    prior_preservation: bool = False
    prior_loss_weight: float = Field(1.0, ge=0)
    noise_offset: float = Field(0.0, ge=0)  # diffusers' --noise_offset (pipeline/diffusion/pretrain.py: diffusion_loss)
    class_images: int = Field(20, gt=0)
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(100, gt=0)
    resume: bool = True
    pretrain: BasePretrainParams = BasePretrainParams()

    @field_validator("lr")
    @classmethod
    def _positive_lr(cls, lr):
        rates = lr.values() if isinstance(lr, dict) else [lr]
        if any(rate <= 0 for rate in rates):
            raise ValueError(f"learning rates must be > 0, got {lr}")
        return lr

    @model_validator(mode="after")
    def _lr_for_method_and_token_in_prompt(self) -> "DiffusionParams":
        if isinstance(self.lr, dict) and self.method not in self.lr:
            raise ValueError(f"lr has no rate for method {self.method!r}; give one or a single number for all methods")
        if "{token}" not in self.prompt:
            raise ValueError(f"prompt must contain '{{token}}' so each class gets its instance token, "
                             f"got {self.prompt!r}")
        return self

    @property
    def learning_rate(self) -> float:
        return self.lr[self.method] if isinstance(self.lr, dict) else self.lr


class GenerateParams(_Section):
    per_class: int = Field(100, ge=0)
    steps: int = Field(20, gt=0)
    guidance: float = Field(5.0, ge=0)
    scheduler: Literal["dpmsolver++", "ddim", "ddpm", "euler", "pndm"] = "dpmsolver++"
    batch: int = Field(16, gt=0)
    negative_prompt: str = ""
    unconditional: Literal["base", "finetuned"] = "base"  # the UNet of guidance's unconditional branch


class ClassifierParams(_Section):
    arch: str = "efficientnet_b0"
    pretrained: bool = False
    image_size: int = Field(64, ge=16)
    epochs: int = Field(20, gt=0)
    batch: int = Field(32, gt=0)  # images per optimizer step over all processes (pipeline/classifier/train.py)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    balance: Literal["weighted_sampler", "class_weighted_loss", "none"] = "weighted_sampler"
    patience: int = Field(5, gt=0)
    min_epochs: int = Field(10, ge=0)  # early stopping waits this long: from scratch, val accuracy starts at chance
    seeds: Seeds = Field(default_factory=lambda: [0])
    equal_steps: bool = True  # as many steps per epoch for every variant: the gain measures data, not compute
    grad_clip: float = Field(1.0, ge=0)  # max gradient norm (0: off); from scratch, Adam spikes without it
    checkpoint_minutes: float = Field(1.0, ge=0)  # 0: every epoch, 10-15 % slower on the demo set


class OracleParams(_Section):
    epochs: int = Field(12, gt=0)
    epoch_images: int = Field(320, gt=0)  # images drawn (class-balanced) per epoch
    seeds: Seeds = Field(default_factory=lambda: [0])  # one judge per seed; fidelity averages their probabilities


class EvaluateParams(_Section):
    bootstrap: int = Field(1000, ge=10)  # resamples of the test images for the 95% CI of the gain


class MemorizationParams(_Section):
    """When a synthetic image counts as a copy of a fine-tuning image (see pipeline/quality/memorization.py)."""

    cosine: float = Field(0.97, gt=0, le=1)  # centred feature cosine to the nearest fine-tune image
    ssim: float = Field(0.90, gt=0, le=1)  # pixel SSIM to that same image
    rule: Literal["both", "either"] = "both"  # both: cosine AND ssim over threshold; either: OR
    exclude: bool = True  # drop flagged images from the augmented training set


class QualityParams(_Section):
    extractor: Literal["baseline_classifier", "inception"] = "baseline_classifier"
    inception_weights: str | None = None  # local torch-fidelity Inception weights (never downloaded)
    memorization: MemorizationParams = MemorizationParams()
    filter_confidence: float | None = Field(None, gt=0, le=1)  # keep if baseline p(class) >= this
    kid_subset_size: int = Field(50, ge=2)
    kid_subsets: int = Field(100, gt=0)
    pr_neighbours: int = Field(3, gt=0)
    closest_pairs: int = Field(8, gt=0)  # pairs drawn per class in reports/quality/closest_<class>.png
    sanity_factor: float = Field(50.0, gt=1)  # an FID above this many times the real-vs-real FID is flagged
    batch: int = Field(32, gt=0)


class SweepParams(_Section):
    methods: list[Method] = Field(default_factory=lambda: list(get_args(Method)), min_length=1)
    amounts: list[int] = Field(default_factory=lambda: [50, 100, 200], min_length=1)  # synthetic images per class
    real_per_class: list[int] = Field(default_factory=lambda: [5, 10, 20, 50])  # []: no scarcity axis
    jobs: int = Field(1, gt=0)  # `dvc queue start -j`: experiments run at once
    timeout_minutes: float = Field(240, gt=0)

    @field_validator("amounts", "real_per_class")
    @classmethod
    def _distinct_positive(cls, values: list[int], info: ValidationInfo) -> list[int]:
        if any(v <= 0 for v in values) or len(set(values)) != len(values):
            why = " (0 is the baseline, drawn without a run)" if info.field_name == "amounts" else ""
            raise ValueError(f"{info.field_name} must be distinct and > 0{why}")
        return values


class ComputeParams(_Section):
    processes: int = Field(1, gt=0)  # > 1: the stage runs under `accelerate launch` (pipeline/core/launch.py)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # fp16/bf16 need a GPU; CPU runs fall back to fp32

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no_is_false(cls, value):
        # YAML 1.1 reads an unquoted `no` as False, and DVC's `-S` rewrite of params.yaml drops the quotes.
        return "no" if value is False else value


class MlflowParams(_Section):
    experiment: str = Field("lesion-synth", min_length=1)


class Params(_Section):
    seed: int = 0
    compute: ComputeParams = ComputeParams()
    data: DataParams = DataParams()
    demo: DemoParams = DemoParams()
    diffusion: DiffusionParams = DiffusionParams()
    generate: GenerateParams = GenerateParams()
    classifier: ClassifierParams = ClassifierParams()
    oracle: OracleParams = OracleParams()
    evaluate: EvaluateParams = EvaluateParams()
    mlflow: MlflowParams = MlflowParams()
    quality: QualityParams = QualityParams()
    sweep: SweepParams = SweepParams()

    def instance_token(self, class_code: str) -> str:
        return self.diffusion.instance_tokens.get(class_code, f"{class_code}tok")

    def class_prompt(self, class_code: str) -> str:
        """The fine-tuning / generation prompt of one class, e.g. 'a dermoscopic image of qzt vascular lesion'."""
        return self.diffusion.prompt.format(token=self.instance_token(class_code), class_name=CLASS_NAMES[class_code])


def parse_params(raw: dict, source: str = "params.yaml") -> Params:
    """Validate a params mapping; any problem becomes one PipelineError line naming the key."""
    if not isinstance(raw, dict):
        raise PipelineError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            raise PipelineError(f"{source}: unknown key {key!r}") from None
        message = error["msg"].removeprefix("Value error, ")
        raise PipelineError(f"{source}: {key}: {message} (got {error.get('input')!r})") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = require_file(path, "params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise PipelineError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return parse_params(raw, str(path))
