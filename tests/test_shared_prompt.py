"""Shared-prompt cross-attention: one prompt embedding for a batch gives the per-image results, else nothing changes."""

from __future__ import annotations

import pytest
import torch

from pipeline.diffusion.lora import add_lora
from pipeline.diffusion.shared_prompt import SharedPromptAttnProcessor, share_prompt_attention
from pipeline.diffusion.tiny import TEXT_DIM, build_tiny_pipeline
from pipeline.params import LoraParams


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    unet = build_tiny_pipeline(32).unet
    add_lora(unet, LoraParams(rank=4, alpha=4))
    with torch.no_grad():  # LoRA's B starts at zero; non-zero adapters make the gradient check meaningful
        for p in unet.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
    return unet


def _forward_backward(unet, states):
    torch.manual_seed(1)
    latents, timesteps = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 990])
    unet.zero_grad(set_to_none=True)
    out = unet(latents, timesteps, states).sample
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}
    return out.detach(), grads


def test_one_prompt_for_the_batch_matches_the_per_image_computation(unet):
    prompt = torch.randn(1, 77, TEXT_DIM)
    expected, expected_grads = _forward_backward(unet, prompt.expand(3, -1, -1))
    assert share_prompt_attention(unet) == 7  # the tiny UNet's cross-attention layers
    out, grads = _forward_backward(unet, prompt)  # batch 1: diffusers' own processor cannot take this
    assert torch.allclose(out, expected, atol=1e-5)
    for name, grad in expected_grads.items():
        assert torch.allclose(grads[name], grad, atol=1e-5, rtol=1e-4), name


def test_a_prompt_per_image_takes_the_original_processor(unet):
    share_prompt_attention(unet)
    layer = next(m for m in unet.modules() if isinstance(getattr(m, "processor", None), SharedPromptAttnProcessor))
    wrapped = layer.processor
    share_prompt_attention(unet)  # installing twice does not wrap twice
    assert layer.processor is wrapped and not isinstance(wrapped.fallback, SharedPromptAttnProcessor)

    states = torch.randn(3, 77, TEXT_DIM)  # e.g. classifier-free guidance: distinct prompts
    shared, _ = _forward_backward(unet, states)
    for module in unet.modules():
        if isinstance(getattr(module, "processor", None), SharedPromptAttnProcessor):
            module.set_processor(module.processor.fallback)
    original, _ = _forward_backward(unet, states)
    assert torch.equal(shared, original)
