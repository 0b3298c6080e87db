"""Hypernetworks: a small trainable network beside the frozen UNet that steers it toward one class.

Two kinds (``diffusion.hypernetwork.kind``), both the base model exactly at initialisation:
- ``encoder_copy``: diffusers' ``ControlNetModel.from_unet``, its condition branch frozen and fed zeros, whose
  zero-initialised outputs join the frozen UNet's skip connections;
- ``context_mlp`` (AUTOMATIC1111 webui): residual MLPs, last layer zero, transform the text context before every
  cross-attention key and value projection, one pair per context width.

The network is the UNet's child ``hypernetwork`` acting through forward pre-hooks, so accelerate and DDP wrap the
UNet whole. Saved as ``hypernetwork.safetensors`` with its config (and the base UNet's shape) in the metadata.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from diffusers import ControlNetModel
from diffusers.models.attention_processor import Attention
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pipeline.core.errors import PipelineError, first_line, require_file
from pipeline.core.params import HypernetworkParams

HYPERNETWORK_FILE = "hypernetwork.safetensors"
CHILD = "hypernetwork"  # the UNet's child module that holds the trainable network
CONFIG_KEY = "hypernetwork_config"
# UNet config keys a hypernetwork's shapes depend on: a file must have been built for the same values.
_INTERFACE = ("in_channels", "block_out_channels", "down_block_types", "layers_per_block", "cross_attention_dim")
_ACTIVATIONS = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "swish": torch.nn.SiLU}


class ContextMLP(torch.nn.Module):
    """x + MLP(x) over the last axis: the webui's HypernetworkModule (normal(0, 0.01) weights), last layer zero."""

    def __init__(self, width: int, layer_structure: list[float], activation: str):
        super().__init__()
        sizes = [int(width * factor) for factor in layer_structure]
        layers: list[torch.nn.Module] = []
        for i, (size_in, size_out) in enumerate(zip(sizes, sizes[1:])):
            linear = torch.nn.Linear(size_in, size_out)
            torch.nn.init.normal_(linear.weight, std=0.01)
            torch.nn.init.zeros_(linear.bias)
            layers.append(linear)
            if activation != "linear" and i < len(sizes) - 2:
                layers.append(_ACTIVATIONS[activation]())
        torch.nn.init.zeros_(layers[-1].weight)
        self.mlp = torch.nn.Sequential(*layers)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        # In the MLP's own dtype: trainable fp32 beside a half-precision UNet works with or without autocast.
        return context + self.mlp(context.to(self.mlp[0].weight.dtype)).to(context.dtype)


def _cross_attentions(unet) -> list[Attention]:
    return [m for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention]


def _hook_context(unet, net: torch.nn.Module) -> None:
    """Transform the input of every cross-attention key/value projection by its MLP."""
    for attn in _cross_attentions(unet):
        for which, projection in (("k", attn.to_k), ("v", attn.to_v)):
            mlp = net.mlps[f"{which}{projection.in_features}"]
            projection.register_forward_pre_hook(lambda _module, args, mlp=mlp: (mlp(args[0]), *args[1:]))


def _hook_encoder(unet, net) -> None:
    """Add the copy's residuals to the UNet's skip connections and mid block (to any a caller already gives)."""
    signature = inspect.signature(unet.forward)

    def steer(_module, args, kwargs):
        call = signature.bind(*args, **kwargs)
        given = call.arguments
        sample = given["sample"]
        # The copy runs in its own weights' dtype (trainable fp32 beside a half-precision UNet, with or without
        # autocast), its frozen condition branch in that branch's dtype; residuals come back in the UNet's.
        dtype, blank_dtype = net.conv_in.weight.dtype, net.controlnet_cond_embedding.conv_in.weight.dtype
        blank = sample.new_zeros(sample.shape[0], 1, *sample.shape[2:], dtype=blank_dtype)
        context = given["encoder_hidden_states"].to(dtype)
        down, mid = net(sample.to(dtype), given["timestep"], context, blank, return_dict=False)
        down, mid = [r.to(sample.dtype) for r in down], mid.to(sample.dtype)
        if given.get("down_block_additional_residuals") is not None:  # a ControlNet's: the UNet takes both or neither
            down = [a + b for a, b in zip(given["down_block_additional_residuals"], down)]
            mid = given["mid_block_additional_residual"] + mid
        given["down_block_additional_residuals"], given["mid_block_additional_residual"] = down, mid
        return call.args, call.kwargs

    unet.register_forward_pre_hook(steer, with_kwargs=True)


def _interface(unet) -> dict:
    return json.loads(json.dumps({key: unet.config.get(key) for key in _INTERFACE}))  # as the file's JSON reads back


def _build(unet, config: dict, load_weights: bool) -> torch.nn.Module:
    """A new network of the config's kind, made on the UNet's device (no copy through host memory)."""
    with torch.device(unet.device):
        if config["kind"] == "encoder_copy":
            # One condition channel through one 1-channel convolution: the cheapest condition branch there is.
            net = ControlNetModel.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=(1,),
                                            load_weights_from_unet=load_weights)
            net.controlnet_cond_embedding.requires_grad_(False)
            return net
        widths = sorted({attn.to_k.in_features for attn in _cross_attentions(unet)})
        # A key MLP and a value MLP per context width; under "mlps", as the saved files name them.
        return torch.nn.ModuleDict({"mlps": torch.nn.ModuleDict({
            f"{which}{width}": ContextMLP(width, config["layer_structure"], config["activation"])
            for width in widths for which in "kv"
        })})


def _attach(unet, net: torch.nn.Module, config: dict) -> None:
    if hasattr(unet, CHILD):
        raise PipelineError("the UNet already has a hypernetwork; load a fresh base model to attach another")
    unet.add_module(CHILD, net)
    unet.hypernetwork_config = config
    {"encoder_copy": _hook_encoder, "context_mlp": _hook_context}[config["kind"]](unet, net)


def add_hypernetwork(unet, cfg: HypernetworkParams) -> list[torch.nn.Parameter]:
    """Freeze the UNet and attach a fresh hypernetwork; returns its trainable parameters."""
    unet.requires_grad_(False)
    config = {**cfg.model_dump(), "unet": _interface(unet)}  # the file records it, and the UNet shape it fits
    net = _build(unet, config, load_weights=True)
    _attach(unet, net, config)
    return [p for p in net.parameters() if p.requires_grad]


def save_hypernetwork(unet, folder: str | Path) -> Path:
    """Write ``hypernetwork.safetensors``: the network's fp32 weights, its config as JSON metadata."""
    path = Path(folder) / HYPERNETWORK_FILE
    weights = {k: v.detach().float().cpu().contiguous() for k, v in getattr(unet, CHILD).state_dict().items()}
    save_file(weights, str(path), metadata={CONFIG_KEY: json.dumps(unet.hypernetwork_config, sort_keys=True)})
    return path


def load_hypernetwork(pipe, folder: str | Path) -> Path:
    """Validate the class's hypernetwork file and attach it to ``pipe.unet``; returns the file."""
    path = require_file(Path(folder) / HYPERNETWORK_FILE, "hypernetwork weights not found; run the finetune stage first")
    try:
        with safe_open(str(path), framework="pt") as handle:
            text = (handle.metadata() or {}).get(CONFIG_KEY)
            weights = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise PipelineError(f"{path}: not a readable safetensors hypernetwork file ({exc})") from None
    if text is None:
        raise PipelineError(f"{path}: no {CONFIG_KEY!r} in the file's metadata; not a hypernetwork of this pipeline")
    try:
        raw = json.loads(text)
        cfg = HypernetworkParams(**{k: raw[k] for k in ("kind", "layer_structure", "activation")})
        config = {**cfg.model_dump(), "unet": dict(raw["unet"])}
    except (ValueError, KeyError, TypeError) as exc:
        raise PipelineError(f"{path}: malformed hypernetwork config in its metadata ({first_line(exc, 200)})") from None
    unet = pipe.unet
    base = _interface(unet)
    for key in _INTERFACE:
        if config["unet"].get(key) != base[key]:
            raise PipelineError(
                f"{path}: built for a UNet with {key}={config['unet'].get(key)} but the base model has {base[key]}: "
                "it was trained for another base model"
            )
    net, kind = _build(unet, config, load_weights=False), config["kind"]
    try:
        missing, unknown = net.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape: torch's second line names it and both shapes
        raise PipelineError(f"{path}: {str(exc).splitlines()[1].strip()}") from None
    if missing:
        raise PipelineError(f"{path}: {len(missing)} tensors of a {kind} hypernetwork missing, e.g. {missing[0]!r}")
    if unknown:
        raise PipelineError(f"{path}: {len(unknown)} tensors a {kind} hypernetwork does not have, e.g. {unknown[0]!r}")
    net.requires_grad_(False).eval()
    if unet.dtype != torch.float32:  # diffusers warns on any dtype cast, so only when one is needed
        net.to(dtype=unet.dtype)
    _attach(unet, net, config)
    return path
