"""Weight initialisation: Kaiming-uniform on convolutions, as the original SpaceNet sample did.

* Every 3x3 conv and every transposed conv (all followed by ReLU, directly or after BN):
  ``U(-b, b)`` with ``b = sqrt(2) * sqrt(3 / fan_in)``, i.e. He et al. 2015, ``fan_in`` mode,
  ReLU gain. This is ``nn.init.kaiming_uniform_(w, nonlinearity="relu")``, not PyTorch's default
  conv init (which uses ``a=sqrt(5)`` and gives a 1/sqrt(6) smaller bound).
* The 1x1 head is followed by softmax, not ReLU, so it takes gain 1 ("linear"): the initial logits
  stay O(1) and the first loss is close to ``log(num_classes)``.
* Biases 0; BatchNorm/GroupNorm weight 1 and bias 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

RELU_GAIN = math.sqrt(2.0)


def conv_fan_in(module: nn.Conv2d | nn.ConvTranspose2d) -> int:
    """Inputs that reach one output value, on average.

    PyTorch's ``_calculate_fan_in_and_fan_out`` reads a transposed conv's weight as if it were a
    conv's and so reports ``out_channels * kH * kW``; a stride-2, 2x2 transposed conv really feeds
    each output pixel from one tap per input channel, so its fan-in is ``in_channels``.
    """
    kh, kw = module.kernel_size
    if isinstance(module, nn.ConvTranspose2d):
        sh, sw = module.stride
        return max(1, (module.in_channels // module.groups) * kh * kw // (sh * sw))
    return (module.in_channels // module.groups) * kh * kw


def kaiming_uniform_bound(fan_in: int, gain: float) -> float:
    """Half-width of the uniform that has std ``gain / sqrt(fan_in)``."""
    return gain * math.sqrt(3.0 / fan_in)


@torch.no_grad()
def init_weights(model: nn.Module, head_name: str = "head") -> None:
    """Initialise ``model`` in place as the module docstring states."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
            gain = 1.0 if name == head_name else RELU_GAIN
            bound = kaiming_uniform_bound(conv_fan_in(module), gain)
            module.weight.uniform_(-bound, bound)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
            if isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
