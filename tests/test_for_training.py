"""for_training's speed-ups change no number: the small-map depthwise weight gradient (depthwise.py) and the
sum-pooled squeeze-and-excitation (squeeze_excite.py) give nn.Conv2d's and timm's results, layer and model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pipeline.classifier.depthwise import SmallMapDepthwiseConv2d, use_small_map_depthwise
from pipeline.classifier.model import create_classifier, for_training
from pipeline.classifier.squeeze_excite import SumPoolSqueezeExcite, use_sum_pool_squeeze_excite


def _grads(conv: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    y = conv(x)
    (y * upstream).sum().backward()
    return y, x.grad, conv.weight.grad


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("size,kernel,stride", [
    ((2, 2), 5, 1), ((4, 4), 5, 1), ((4, 4), 5, 2), ((2, 2), 3, 1), ((3, 5), 5, 1), ((1, 1), 5, 1), ((5, 5), 5, 2),
])
def test_small_map_gradients_match_conv2d(one_thread, size, kernel, stride, channels_last):
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(24, 24, kernel, stride, padding=((stride - 1) + (kernel - 1)) // 2, groups=24, bias=False)
    holder = torch.nn.Sequential(copy.deepcopy(plain))
    assert use_small_map_depthwise(holder) == 1
    fast = holder[0]
    assert isinstance(fast, SmallMapDepthwiseConv2d)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(6, 24, *size).contiguous(memory_format=layout)
    upstream = torch.randn_like(F.conv2d(x, plain.weight, None, plain.stride, plain.padding, 1, 24))
    y_plain, gx_plain, gw_plain = _grads(plain, x, upstream)
    y_fast, gx_fast, gw_fast = _grads(fast, x, upstream)
    assert type(y_fast.grad_fn).__name__ == "_SmallMapDepthwiseBackward"
    torch.testing.assert_close(y_fast, y_plain)
    torch.testing.assert_close(gx_fast, gx_plain)
    torch.testing.assert_close(gw_fast, gw_plain, rtol=1e-5, atol=1e-5)


def test_large_maps_and_inference_use_the_plain_convolution(one_thread):
    holder = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=False))
    use_small_map_depthwise(holder)
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    assert type(holder(x).grad_fn).__name__ == "ConvolutionBackward0"  # 8x8 map: larger than the 5x5 kernel
    small = torch.randn(2, 8, 4, 4, requires_grad=True)
    assert type(holder(small).grad_fn).__name__ == "_SmallMapDepthwiseBackward"
    with torch.no_grad():
        torch.testing.assert_close(holder(small), F.conv2d(small, holder[0].weight, padding=2, groups=8))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision keeps autocast's own convolution
        assert type(holder(small).grad_fn).__name__ == "ConvolutionBackward0"


def test_ineligible_convolutions_are_left_alone():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=True),  # bias
        torch.nn.Conv2d(8, 16, 5, padding=2, groups=8, bias=False),  # channel multiplier
        torch.nn.Conv2d(8, 8, 5, padding=4, dilation=2, groups=8, bias=False),  # dilation
        torch.nn.Conv2d(8, 8, 5, padding="same", groups=8, bias=False),  # string padding
        torch.nn.Conv2d(8, 8, 1, bias=False),  # not depthwise
    )
    assert use_small_map_depthwise(model) == 0
    assert all(type(m) is torch.nn.Conv2d for m in model)


def test_sum_pooled_squeeze_excite_matches_timm(one_thread):
    torch.manual_seed(0)
    plain = create_classifier("efficientnet_b0", 5, pretrained=False).blocks[2][0].se  # 144 channels
    holder = torch.nn.Sequential(copy.deepcopy(plain))
    assert use_sum_pool_squeeze_excite(holder) == 1 and type(holder[0]) is SumPoolSqueezeExcite
    x = torch.randn(4, 144, 16, 16).contiguous(memory_format=torch.channels_last)
    upstream = torch.randn_like(x)
    outputs = []
    for block in (plain, holder[0]):
        xi = x.clone().requires_grad_(True)
        y = block(xi)
        (y * upstream).sum().backward()
        outputs.append((y, xi.grad, block.conv_reduce.weight.grad))
    for got, want in zip(outputs[1], outputs[0]):
        torch.testing.assert_close(got, want)


def _count_nodes(root, name: str) -> int:
    seen, stack, count = set(), [root], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += type(node).__name__ == name
        stack.extend(next_node for next_node, _ in node.next_functions)
    return count


def test_efficientnet_trains_the_same_with_for_training(one_thread):
    torch.manual_seed(0)
    plain = create_classifier("efficientnet_b0", 5, pretrained=False)
    fast = for_training(copy.deepcopy(plain))
    assert fast.state_dict().keys() == plain.state_dict().keys()
    assert sum(isinstance(m, SmallMapDepthwiseConv2d) for m in fast.modules()) == 16  # every depthwise layer
    assert sum(isinstance(m, SumPoolSqueezeExcite) for m in fast.modules()) == 16  # every block's SE
    assert not any(getattr(m, "inplace", False) for m in fast.modules() if isinstance(m, torch.nn.SiLU))
    assert fast.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    losses = []
    for model in (plain, fast):
        model.train()
        torch.manual_seed(1)  # same dropout draws
        loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
        losses.append(loss)
    # At 64 px 8 layers take the matrix weight gradient: the 5x5 ones on 4x4 and 2x2 inputs, the 3x3 one on 2x2.
    assert _count_nodes(losses[1].grad_fn, "_SmallMapDepthwiseBackward") == 8
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0])
    fast_params = dict(fast.named_parameters())
    for name, param in plain.named_parameters():
        torch.testing.assert_close(fast_params[name].grad, param.grad, rtol=1e-4, atol=1e-5, msg=name)
