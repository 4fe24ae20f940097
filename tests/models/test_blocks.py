"""Pad-to-multiple and crop: the reason any input size works."""

from __future__ import annotations

import pytest
import torch

from models.blocks import crop_padding, pad_to_multiple


@pytest.mark.parametrize("mode", ["reflect", "replicate", "zeros"])
@pytest.mark.parametrize("size", [(650, 650), (16, 16), (1, 1), (5, 37)])
def test_pad_then_crop_is_identity(mode: str, size: tuple[int, int]) -> None:
    x = torch.rand(2, 3, *size)
    padded, pads = pad_to_multiple(x, 16, mode)
    assert padded.shape[-2] % 16 == 0 and padded.shape[-1] % 16 == 0
    torch.testing.assert_close(crop_padding(padded, pads), x, rtol=0, atol=0)


def test_650_pads_three_on_each_side() -> None:
    _, pads = pad_to_multiple(torch.rand(1, 3, 650, 650), 16)
    assert pads == (3, 3, 3, 3)


def test_reflect_mirrors_the_edge() -> None:
    x = torch.arange(14.0).expand(1, 1, 14, 14)
    padded, pads = pad_to_multiple(x, 16, "reflect")
    assert pads == (1, 1, 1, 1)
    assert padded[0, 0, 1, :3].tolist() == [1.0, 0.0, 1.0]  # reflect, not repeat


@pytest.mark.parametrize(
    ("mode", "row"),
    [
        ("reflect", [2.0, 1.0, 2.0, 13.0, 14.0, 13.0]),
        ("replicate", [1.0, 1.0, 2.0, 13.0, 14.0, 14.0]),
        ("zeros", [0.0, 1.0, 2.0, 13.0, 14.0, 0.0]),
    ],
)
def test_each_mode_pads_as_named(mode: str, row: list[float]) -> None:
    # model.pad_mode="zeros" must pad with zeros, not with the edge values replicate gives
    x = torch.arange(1.0, 15.0).expand(1, 1, 14, 14)
    padded, pads = pad_to_multiple(x, 16, mode)
    assert pads == (1, 1, 1, 1)
    assert padded[0, 0, 1, :3].tolist() + padded[0, 0, 1, -3:].tolist() == row


def test_too_small_to_reflect_falls_back_to_replicate() -> None:
    x = torch.arange(3.0).expand(1, 1, 3, 3)
    padded, pads = pad_to_multiple(x, 16, "reflect")  # 13 more columns: more than 3 can mirror
    assert pads == (6, 7, 6, 7)
    assert padded[0, 0, 6, :6].tolist() == [0.0] * 6  # the edge values repeated, both sides
    assert padded[0, 0, 6, -7:].tolist() == [2.0] * 7


def test_a_pad_as_wide_as_the_input_also_falls_back() -> None:
    # 3 -> 8 pads 2 and 3: reflect needs each pad < 3, so the 3 must replicate too
    x = torch.arange(3.0).expand(1, 1, 3, 3)
    padded, pads = pad_to_multiple(x, 8, "reflect")
    assert pads == (2, 3, 2, 3)
    assert padded[0, 0, 2].tolist() == [0.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]


def test_multiple_of_16_is_untouched() -> None:
    x = torch.rand(1, 3, 32, 48)
    padded, pads = pad_to_multiple(x, 16)
    assert padded is x and pads == (0, 0, 0, 0)


def test_group_norm_output_does_not_depend_on_the_batch() -> None:
    """norm="group": a sample's output is the same alone or in a batch (what makes a DDP run
    equal a single-process run of the same global batch); BatchNorm's is not."""
    import torch

    from models import build_model

    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    for norm, same in (("group", True), ("batch", False)):
        net = build_model("unet_baseline", 3, 3, width_divisor=8, norm=norm).train()
        together = net(x)[:1]
        alone = net(x[:1])
        assert torch.allclose(together, alone, atol=1e-5) is same, norm
    gn = build_model("unet_baseline", 3, 3, width_divisor=8, norm="group")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in gn.modules())
    groups = {(m.num_channels, m.num_groups) for m in gn.modules()
              if isinstance(m, torch.nn.GroupNorm)}
    assert groups == {(4, 4), (8, 8), (16, 8), (32, 8), (64, 8)}  # 8, or fewer channels
