"""The embedded tiny base model: SD 1.5's own diffusers classes, shrunk to train on 2 CPU cores, and saved with
``save_pretrained`` so every later stage loads it exactly as it would load a real checkpoint."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from pipeline.core.params import CLASS_NAMES

TEXT_DIM = 64
DOMAIN_WORDS = sorted(
    {"a", "an", "of", "the", "photo", "dermoscopic", "image", "skin", "lesion", "close", "up"}
    | {word for name in CLASS_NAMES.values() for word in name.split()}
    | set(CLASS_NAMES)
)


def vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A tiny CLIP BPE vocab: byte-level symbols cover any text; whole-word merges exist only for DOMAIN_WORDS, so
    rare instance tokens such as "sks" split into pieces exactly as they do in a real CLIP vocab."""
    symbols = list(bytes_to_unicode().values())
    vocab = dict.fromkeys(symbols + [s + "</w>" for s in symbols])  # dicts as ordered sets: first occurrence wins
    merges: dict[tuple[str, str], None] = {}
    for word in DOMAIN_WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        for i in range(1, len(pieces)):
            merges["".join(pieces[:i]), pieces[i]] = None
            vocab["".join(pieces[: i + 1])] = None
    vocab.update(dict.fromkeys(["<|startoftext|>", "<|endoftext|>"]))
    return {token: i for i, token in enumerate(vocab)}, list(merges)


def build_tokenizer() -> CLIPTokenizer:
    vocab, merges = vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_tiny_pipeline(resolution: int = 32, seed: int = 0) -> StableDiffusionPipeline:
    """A randomly initialised tiny SD pipeline whose VAE downsamples by 2 (SD: 8): at 32 px (where the oracle tells
    real images apart as well as at 128) it keeps each lesion's colour after minutes of training on 2 cores. A 4x VAE
    at 64 px kept no more of the class (oracle: 79% of its reconstructions, 80% of this one's) for 2.5x the training
    time; with diffusers' AutoencoderTiny, fine-tuned models' samples scored 42-47% class fidelity (this one: 60%)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_DIM,
            intermediate_size=TEXT_DIM * 2,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=resolution,
    )
    unet = UNet2DConditionModel(
        sample_size=resolution // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 128),
        # Attention only at the two coarse levels (and the mid block): at the 16x16 level it would
        # double the cost of a training step on CPU for little gain at this size.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        prediction_type="epsilon", steps_offset=1, clip_sample=False,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
