"""Fine-tuning and generation with every model on a *fake* CUDA device: device bugs show up without a GPU.

torch's FakeTensorMode gives tensors a device, shape and dtype but no data: modules built inside it on
"cuda" run their forward passes on this CPU-only machine, and any op that mixes a cuda and a cpu tensor
raises FakeTensorDeviceMismatchError, exactly where real CUDA would fail. Backward needs a real CUDA
context, so the fine-tuning tests stop at the loss. The steps are the stage's own functions
(``encode_images``, ``encode_prompts``, ``attach_method``, ``draw_batch``, ``diffusion_loss``,
``sample_images``).

Three things cannot be faked and are done differently from the stage:
- ``module.to`` fails on fake parameters (torch swaps them, and the fake mode holds a weakref to each), and
  peft calls it when it attaches an adapter. So the pipeline is built and its method attached for real on
  the CPU, and ``on_fake_cuda`` then gives every parameter and buffer a fake cuda twin of the same shape,
  dtype and requires_grad: what ``pipe.to("cuda")`` does in the stage;
- ``torch.Generator(device="cuda")`` needs a CUDA driver. The stage makes its generators on the model's
  device; here they are CPU generators, and every draw names the device it draws on, which is what
  decides where the tensor lands (fake mode does not check the generator's device, real CUDA does).
- diffusers' schedulers read timestep *values* in ``set_timesteps``/``step`` (``.numpy()``, ``nonzero``,
  ``if t >= 0``), which a fake tensor does not have. The generation test swaps in ``OneStepScheduler``;
  the text encoder, classifier-free guidance, UNet, VAE decode and post-processing are diffusers' own.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from diffusers import DDPMScheduler
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode

from diffusion_workspace import micro_params
from pipeline.diffusion.finetune import Batch, Priors, attach_method, cast_frozen, diffusion_loss, draw_batch, generic_prompt
from pipeline.diffusion.generate import Sampling, sample_images
from pipeline.diffusion.tiny import build_tiny_pipeline
from pipeline.diffusion.training_data import encode_images, encode_prompts, tokenize

pytestmark = [pytest.mark.device_sim, pytest.mark.usefixtures("one_thread")]

RESOLUTION = 32
BATCH = 2


@contextmanager
def on_fake_cuda(pipe, *more):
    """Fake mode with every weight of ``pipe`` (and of ``more`` modules) on fake cuda. There is no default device in
    the body, so a tensor that the code under test makes without naming a device lands on the CPU, as it would on a
    GPU machine."""
    with FakeTensorMode():
        for model in (pipe.vae, pipe.text_encoder, pipe.unet, *more):
            for module in model.modules():
                for name, param in list(module.named_parameters(recurse=False)):
                    twin = torch.empty(param.shape, dtype=param.dtype, device="cuda")
                    setattr(module, name, torch.nn.Parameter(twin, requires_grad=param.requires_grad))
                for name, buffer in list(module.named_buffers(recurse=False)):
                    setattr(module, name, torch.empty(buffer.shape, dtype=buffer.dtype, device="cuda"))
        pipe.set_progress_bar_config(disable=True)
        yield pipe


def fake_images(count: int) -> torch.Tensor:
    """uint8 [N, 3, R, R] on the CPU, as ``load_square`` returns them."""
    return torch.randint(0, 256, (count, 3, RESOLUTION, RESOLUTION), dtype=torch.uint8)


def finetune_loss(method: str, prior_preservation: bool = False, dtype: torch.dtype = torch.float32):
    """The stage's set-up and one step of its loop with frozen weights in ``dtype`` (compute.mixed_precision), up to
    the loss; returns (loss, the pipeline, its trained part). Without autocast: torch disables
    ``torch.autocast("cuda")`` where no CUDA device exists, so the step relies on its explicit casts alone."""
    params = micro_params(method, {"prior_preservation": prior_preservation, "noise_offset": 0.2})
    pipe = build_tiny_pipeline(RESOLUTION)
    part = attach_method(pipe, params, "df")
    cast_frozen(pipe, part, dtype)
    with on_fake_cuda(pipe):
        instances = encode_images(pipe.vae, fake_images(3))
        priors = None
        if prior_preservation:
            priors = Priors(encode_images(pipe.vae, fake_images(2)), encode_prompts(pipe, [generic_prompt(params, "df")]),
                        params.diffusion.prior_loss_weight)
        assert all(p.device.type == "cuda" for p in part.named_trainable().values())
        prompt_ids = tokenize(pipe.tokenizer, [params.class_prompt("df")]).to(pipe.device)
        states = part.module(prompt_ids)[0] if part.trains_text else encode_prompts(pipe, [params.class_prompt("df")])
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        generator = torch.Generator().manual_seed(0)
        batch = draw_batch(instances, priors, states, BATCH, generator)
        loss = diffusion_loss(pipe.unet, noise_scheduler, batch, generator, params.diffusion.noise_offset, dtype)
        assert batch.latents.device.type == "cuda" and batch.states.device.type == "cuda"
        assert len(batch.latents) == len(batch.states) == BATCH * (2 if prior_preservation else 1)
        return loss, pipe, part


def test_the_fake_device_catches_a_cpu_cuda_mix():
    with FakeTensorMode(), pytest.raises(FakeTensorDeviceMismatchError):
        torch.ones(2, device="cuda") + torch.ones(2)


@pytest.mark.parametrize(
    ("method", "prior_preservation"), [("lora", False), ("dreambooth", True), ("textual_inversion", False)]
)
def test_one_fine_tuning_step_runs_on_cuda_up_to_the_loss(method, prior_preservation):
    loss, _, _ = finetune_loss(method, prior_preservation)
    assert loss.device.type == "cuda" and loss.shape == () and loss.dtype == torch.float32
    assert loss.requires_grad


def test_a_half_precision_lora_step_keeps_the_adapter_in_fp32_and_the_loss_in_fp32():
    loss, pipe, part = finetune_loss("lora", dtype=torch.float16)
    assert loss.device.type == "cuda" and loss.dtype == torch.float32 and loss.requires_grad
    assert {p.dtype for p in part.named_trainable().values()} == {torch.float32}
    assert pipe.unet.conv_in.weight.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float16


class OneStepScheduler:
    """Just enough of a scheduler for one denoising step on fake tensors (see the module docstring)."""

    order = 1
    init_noise_sigma = 1.0

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        self.timesteps = torch.full((num_inference_steps,), 500, device=device)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, **kwargs) -> tuple[torch.Tensor]:
        return (sample - 0.1 * model_output,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_guided_denoising_step_and_the_sliced_vae_decode_run_on_cuda(dtype):
    """In fp32 and in the fp16 that generate loads the pipeline in for compute.mixed_precision=fp16."""
    with on_fake_cuda(build_tiny_pipeline(RESOLUTION).to(dtype=dtype)) as pipe:
        pipe.scheduler = OneStepScheduler()
        pipe.vae.enable_slicing()  # as generate_class does
        generators = [torch.Generator().manual_seed(seed) for seed in (1, 2, 3)]
        images = sample_images(pipe, "a dermoscopic image of sks dermatofibroma", "blurry", generators, Sampling(1, 5.0, RESOLUTION))
        assert images.device.type == "cuda" and images.shape == (3, 3, RESOLUTION, RESOLUTION) and images.dtype == dtype


def test_a_half_precision_controlnet_step_runs_on_cuda_with_the_controlnet_in_fp32():
    """The controlnet stage's step: a trainable fp32 ControlNet beside a frozen fp16 UNet, masks made on the CPU
    and moved as the stage moves them, up to the loss."""
    from pipeline.diffusion.controlnet import controlled, make_controlnet

    pipe = build_tiny_pipeline(RESOLUTION)
    controlnet = make_controlnet(pipe.unet, pipe.vae_scale_factor)
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.requires_grad_(False).to(dtype=torch.float16)
    with on_fake_cuda(pipe, controlnet):
        latents = encode_images(pipe.vae, fake_images(3))
        masks = torch.ones(6, 3, RESOLUTION, RESOLUTION).to(pipe.device)
        states = encode_prompts(pipe, ["a dermoscopic image of sks dermatofibroma"])
        generator = torch.Generator().manual_seed(0)
        index = torch.randint(len(latents), (BATCH,), generator=generator, device=pipe.device)
        batch = Batch(latents.sample(index, generator), states.expand(BATCH, -1, -1))
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        loss = diffusion_loss(controlled(pipe.unet, controlnet, masks[index]), noise_scheduler, batch, generator,
                              dtype=torch.float16)
        assert loss.device.type == "cuda" and loss.dtype == torch.float32 and loss.requires_grad
        assert {p.dtype for p in controlnet.parameters()} == {torch.float32}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_mask_conditioned_denoising_step_guided_by_the_base_unet_runs_on_cuda(dtype):
    """generate's sampling under diffusion.control mask and generate.unconditional base: a ControlNet, a second
    (base) UNet for guidance's unconditional branch, masks made on the CPU (conditioning_masks) and handed over on the
    pipeline's device."""
    from pipeline.diffusion.controlnet import make_controlnet
    from pipeline.diffusion.generate import Control

    pipe = build_tiny_pipeline(RESOLUTION).to(dtype=dtype)
    controlnet = make_controlnet(pipe.unet, pipe.vae_scale_factor).to(dtype=dtype)
    guide_unet = build_tiny_pipeline(RESOLUTION, seed=1).unet.to(dtype=dtype)
    with on_fake_cuda(pipe, controlnet, guide_unet):
        pipe.scheduler = OneStepScheduler()
        masks = torch.zeros(2, 3, RESOLUTION, RESOLUTION)
        control = Control(controlnet, masks.to(pipe.device), 1.0)
        generators = [torch.Generator().manual_seed(seed) for seed in (1, 2)]
        sampling = Sampling(1, 5.0, RESOLUTION, guide_unet)
        images = sample_images(pipe, "a dermoscopic image of sks dermatofibroma", "", generators, sampling, control)
        assert images.device.type == "cuda" and images.shape == (2, 3, RESOLUTION, RESOLUTION) and images.dtype == dtype
