"""The project's optimizer: fused AdamW, and its checkpointed state restored into parameters of any memory layout."""

from __future__ import annotations

import torch

from pipeline.checkpoint import OPTIMIZER, Checkpoint, load_checkpoint, save_checkpoint
from pipeline.optim import adamw


def _one_step(fused_with_helper: bool) -> torch.Tensor:
    """One AdamW step on a channels_last conv weight whose moments come from a (contiguous) checkpoint."""
    torch.manual_seed(0)
    weight = torch.randn(4, 3, 5, 5)
    moments = {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 3, 5, 5), "exp_avg_sq": torch.rand(4, 3, 5, 5)}
    grad = torch.randn(4, 3, 5, 5)
    param = torch.nn.Parameter(weight.contiguous(memory_format=torch.channels_last))
    if fused_with_helper:
        optimizer = adamw([param], lr=0.1, weight_decay=0.01)
        saved = Checkpoint({OPTIMIZER: {"param_groups": optimizer.state_dict()["param_groups"]}},
                           {f"{OPTIMIZER}.0.{name}": value for name, value in moments.items()})
        saved.restore_optimizer(optimizer)
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


def test_state_survives_safetensors_and_json(tmp_path):
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = adamw(params, lr=1e-3, weight_decay=0.01)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    save_checkpoint(tmp_path / "ckpt", "key", {}, {}, optimizer)
    fresh = adamw([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, weight_decay=0.0)
    load_checkpoint(tmp_path / "ckpt", "key").restore_optimizer(fresh)
    restored, original = fresh.state_dict(), optimizer.state_dict()
    assert restored["param_groups"] == original["param_groups"]  # betas are a tuple again
    assert restored["state"].keys() == original["state"].keys()
    for index, entries in original["state"].items():
        assert entries.keys() == restored["state"][index].keys()
        for name, value in entries.items():
            assert torch.equal(restored["state"][index][name], value), (index, name)
