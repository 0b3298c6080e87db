"""Textual inversion: the class is learned as one new word, a trainable row spliced into the frozen token table
(``NewTokenEmbedding``), so the optimizer holds one vector and no weight of the model can drift. Saved as
{token: [1, D]}, what ``pipe.load_textual_inversion`` reads."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.core.errors import PipelineError, first_line, require_file

EMBEDS_FILE = "learned_embeds.safetensors"


class NewTokenEmbedding(torch.nn.Module):
    """The frozen token table, except that ``token_id`` reads the trainable ``row``."""

    def __init__(self, table: torch.nn.Embedding, token_id: int, init: torch.Tensor):
        super().__init__()
        self.table = table.requires_grad_(False)
        self.token_id = token_id
        self.row = torch.nn.Parameter(init.detach().clone().float())

    @property
    def weight(self) -> torch.Tensor:  # transformers reads .weight for dtype/shape checks
        return self.table.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.table(input_ids)
        return torch.where((input_ids == self.token_id).unsqueeze(-1), self.row.to(out.dtype), out)


def add_token(pipe: StableDiffusionPipeline, token: str, init_text: str) -> NewTokenEmbedding:
    """Add ``token`` to the tokenizer and give it a trainable embedding initialised at the mean of ``init_text``'s."""
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    if tokenizer.add_tokens(token) == 0:
        raise PipelineError(
            f"instance token {token!r} is already a word of the tokenizer; textual inversion needs a new one "
            "(change diffusion.instance_tokens)"
        )
    init_ids = tokenizer(init_text, add_special_tokens=False).input_ids
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the new row is replaced below
    table = text_encoder.get_input_embeddings()
    init = table.weight[init_ids].mean(0)
    embedding = NewTokenEmbedding(table, tokenizer.convert_tokens_to_ids(token), init)
    text_encoder.set_input_embeddings(embedding)
    return embedding


def save_embedding(embedding: NewTokenEmbedding, token: str, folder: str | Path) -> Path:
    path = Path(folder) / EMBEDS_FILE
    save_file({token: embedding.row.detach().float().cpu().reshape(1, -1).contiguous()}, str(path))
    return path


def load_embedding(pipe: StableDiffusionPipeline, folder: str | Path, token: str) -> Path:
    """Validate and load the class's learned word into ``pipe``'s tokenizer and text encoder; returns the file."""
    path = require_file(Path(folder) / EMBEDS_FILE, "learned embedding not found; run the finetune stage first")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise PipelineError(f"{path}: not a readable safetensors embedding ({exc})") from None
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    if list(tensors) != [token]:
        raise PipelineError(f"{path}: expected one embedding named {token!r}, found {sorted(tensors)[:5]}")
    if tensors[token].shape != (1, width):
        raise PipelineError(
            f"{path}: embedding has shape {list(tensors[token].shape)} but this text encoder needs [1, {width}]: "
            "it was trained for another base model"
        )
    try:
        pipe.load_textual_inversion(tensors, token=token)
    except (ValueError, RuntimeError) as exc:
        raise PipelineError(f"{path}: could not load textual inversion ({first_line(exc)})") from None
    return path
