"""The project's optimizer: fused AdamW, and restoring its state into parameters of any memory layout."""

from __future__ import annotations

import json

import torch

from pipeline.optim import adamw, load_optimizer_state, state_from_tensors, state_tensors


def _one_step(fused_with_helper: bool) -> torch.Tensor:
    """One AdamW step on a channels_last conv weight whose moments come from a (contiguous) checkpoint."""
    torch.manual_seed(0)
    weight = torch.randn(4, 3, 5, 5)
    moments = {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 3, 5, 5), "exp_avg_sq": torch.rand(4, 3, 5, 5)}
    grad = torch.randn(4, 3, 5, 5)
    param = torch.nn.Parameter(weight.contiguous(memory_format=torch.channels_last))
    if fused_with_helper:
        optimizer = adamw([param], lr=0.1, weight_decay=0.01)
        load_optimizer_state(optimizer, {"state": {0: moments}, "param_groups": optimizer.state_dict()["param_groups"]})
    else:  # the plain for-loop implementation: layout-agnostic, the reference
        optimizer = torch.optim.AdamW([param], lr=0.1, weight_decay=0.01, foreach=False)
        optimizer.load_state_dict({"state": {0: moments}, "param_groups": optimizer.state_dict()["param_groups"]})
    param.grad = grad.contiguous(memory_format=torch.channels_last)
    optimizer.step()
    return param.detach().contiguous()


def test_restored_state_follows_the_parameter_layout():
    assert torch.allclose(_one_step(fused_with_helper=True), _one_step(fused_with_helper=False), atol=1e-6)


def test_optimizer_is_fused():
    assert adamw([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, weight_decay=0.0).defaults["fused"] is True


def test_state_survives_safetensors_and_json():
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = adamw(params, lr=1e-3, weight_decay=0.01)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    tensors, rest = state_tensors(optimizer)
    restored = state_from_tensors(tensors, json.loads(json.dumps(rest)))  # what a checkpoint folder holds
    original = optimizer.state_dict()
    assert restored["param_groups"] == original["param_groups"]  # betas are a tuple again
    assert restored["state"].keys() == original["state"].keys()
    for index, entries in original["state"].items():
        for name, value in entries.items():
            assert torch.equal(restored["state"][index][name], value), (index, name)
