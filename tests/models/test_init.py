"""Initialisation as stated in models/init.py: Kaiming-uniform (ReLU gain) on convolutions."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models import build_model, list_models
from models.init import conv_fan_in


@pytest.mark.parametrize("name", list_models())
def test_convs_are_kaiming_uniform(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 3, 3, width_divisor=2)
    for module_name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            continue
        gain = 1.0 if module_name == "head" else math.sqrt(2.0)
        bound = gain * math.sqrt(3.0 / conv_fan_in(m))
        w = m.weight.detach()
        assert w.abs().max() <= bound + 1e-7, module_name
        # A uniform on [-b, b] has std b / sqrt(3); with >= 1e3 samples the estimate is within 10%.
        if w.numel() >= 1000:
            assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), module_name
            assert w.abs().max() > 0.95 * bound, module_name
        if m.bias is not None:
            assert torch.all(m.bias == 0), module_name


@pytest.mark.parametrize("name", list_models())
def test_batchnorm_starts_as_identity(name: str) -> None:
    model = build_model(name, 3, 3, width_divisor=4)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_transposed_conv_fan_in_counts_inputs_per_output() -> None:
    up = nn.ConvTranspose2d(64, 32, kernel_size=2, stride=2)
    assert conv_fan_in(up) == 64  # one tap per input channel, not 32 * 2 * 2
    assert conv_fan_in(nn.Conv2d(64, 32, 3)) == 64 * 9


def test_first_loss_is_near_uniform_guess() -> None:
    # The linear-gain head keeps initial logits O(1): CE starts near log(3), not at tens.
    torch.manual_seed(0)
    model = build_model("unet_baseline", 3, 3, width_divisor=4).train()
    logits = model(torch.rand(2, 3, 64, 64))
    loss = nn.functional.cross_entropy(logits, torch.randint(0, 3, (2, 64, 64)))
    assert 0.5 * math.log(3) < loss.item() < 2 * math.log(3)
