"""Losses: weighted CE as torch defines it, focal, soft Dice, mixing, ignore_index, AMP, config
errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from models import LossConfig, SegmentationLoss, build_loss, class_weights_from_frequencies


def logits_and_target(n: int = 2, c: int = 3, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, size, size, generator=g, requires_grad=True)
    target = torch.randint(0, c, (n, size, size), generator=g)
    return logits, target


# (0.2, 0.5, 0.3): the default 0.1/0.8/0.1 reads the same backwards, so weights applied to the
# wrong classes (as manifest-derived weights would be) could not show there
@pytest.mark.parametrize("weights", [(0.1, 0.8, 0.1), (0.2, 0.5, 0.3)])
def test_ce_equals_torch_weighted_cross_entropy_with_ignore(weights: tuple[float, ...]) -> None:
    logits, target = logits_and_target()
    target[0, :4] = -100
    loss = build_loss(LossConfig(class_weights=weights))(logits, target)
    ref = nn.CrossEntropyLoss(weight=torch.tensor(weights), ignore_index=-100)
    torch.testing.assert_close(loss, ref(logits, target))


def test_custom_ignore_index() -> None:
    logits, target = logits_and_target()
    target[:, :, :3] = 255
    loss = build_loss(LossConfig(ignore_index=255))(logits, target)
    ref = nn.CrossEntropyLoss(weight=torch.tensor([0.1, 0.8, 0.1]), ignore_index=255)
    torch.testing.assert_close(loss, ref(logits, target))


@pytest.mark.parametrize("dice_weight", [0.0, 1.0])
def test_a_class_left_out_still_ignores_the_loaders_padding(dice_weight: float) -> None:
    """ignore_index=2 (the boundary) on a batch the loader padded with -100: it raised
    IndexError ("Target -100 is out of bounds") at the first padded batch."""
    logits, target = logits_and_target()
    target[0] = -100  # a padded sample
    loss = build_loss(LossConfig(ignore_index=2, dice_weight=dice_weight))(logits, target)
    both = target.masked_fill(target == -100, 2)  # the reference: padding and class 2 ignored
    ref = build_loss(LossConfig(ignore_index=2, dice_weight=dice_weight))(logits, both)
    torch.testing.assert_close(loss, ref)
    assert torch.isfinite(loss)
    if dice_weight == 0:
        ce = nn.CrossEntropyLoss(weight=torch.tensor([0.1, 0.8, 0.1]), ignore_index=2)
        torch.testing.assert_close(loss, ce(logits, both))


def test_all_ignored_batch_gives_zero_with_a_graph() -> None:
    logits, target = logits_and_target()
    target.fill_(-100)
    loss = build_loss(LossConfig(dice_weight=1.0))(logits, target)
    assert loss.item() == 0.0
    loss.backward()  # the graph exists, so DDP sees every parameter used
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_dice_is_one_minus_mean_class_dice() -> None:
    logits, target = logits_and_target()
    loss_fn = build_loss(LossConfig(ce_weight=0.0, dice_weight=1.0, dice_smooth=1.0))
    probs = logits.softmax(1)
    one_hot = nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float()
    inter = (probs * one_hot).sum((0, 2, 3))
    card = probs.sum((0, 2, 3)) + one_hot.sum((0, 2, 3))
    expected = 1 - ((2 * inter + 1) / (card + 1)).mean()
    torch.testing.assert_close(loss_fn(logits, target), expected)


def test_dice_by_hand() -> None:
    # Uniform probabilities (1/3 each) over two pixels whose targets are classes 0 and 1, smooth 1:
    # class 0 and 1: (2 * 1/3 + 1) / (2/3 + 1 + 1) = 5/8; class 2: (0 + 1) / (2/3 + 0 + 1) = 3/5.
    # Loss = 1 - (5/8 + 5/8 + 3/5) / 3 = 23/60.
    logits = torch.zeros(1, 3, 1, 2)
    target = torch.tensor([[[0, 1]]])
    loss = build_loss(LossConfig(ce_weight=0.0, dice_weight=1.0, dice_smooth=1.0))(logits, target)
    assert loss.item() == pytest.approx(23 / 60, abs=1e-6)
    # An ignored third pixel changes nothing.
    loss3 = build_loss(LossConfig(ce_weight=0.0, dice_weight=1.0))(
        torch.zeros(1, 3, 1, 3), torch.tensor([[[0, 1, -100]]]))
    assert loss3.item() == pytest.approx(23 / 60, abs=1e-6)


def test_dice_smooth_by_hand() -> None:
    # loss.dice_smooth = 1/3 on test_dice_by_hand's two pixels: classes 0 and 1 score
    # (2/3 + 1/3) / (5/3 + 1/3) = 1/2, class 2 scores (1/3) / (2/3 + 1/3) = 1/3: 1 - 4/9 = 5/9.
    cfg = LossConfig(ce_weight=0.0, dice_weight=1.0, dice_smooth=1 / 3)
    loss = build_loss(cfg)(torch.zeros(1, 3, 1, 2), torch.tensor([[[0, 1]]]))
    assert loss.item() == pytest.approx(5 / 9, abs=1e-6)


def test_ce_by_hand() -> None:
    # Uniform logits: every pixel's CE is ln 3, so the weighted mean is ln 3 whatever the weights.
    # Logits favouring the target by a: CE = ln(1 + 2 e^-a); weights 0.1 and 0.8 on two pixels
    # give (0.1 * ln 3 + 0.8 * ln(1 + 2 e^-2)) / 0.9.
    loss_fn = build_loss(LossConfig())
    assert loss_fn(torch.zeros(1, 3, 1, 2), torch.tensor([[[0, 1]]])).item() == pytest.approx(
        math.log(3), abs=1e-6)
    logits = torch.zeros(1, 3, 1, 2)
    logits[0, 1, 0, 1] = 2.0
    expected = (0.1 * math.log(3) + 0.8 * math.log(1 + 2 * math.exp(-2))) / 0.9
    assert loss_fn(logits, torch.tensor([[[0, 1]]])).item() == pytest.approx(expected, abs=1e-6)


def test_dice_of_a_perfect_prediction_is_near_zero() -> None:
    _, target = logits_and_target()
    logits = nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 50
    loss = build_loss(LossConfig(ce_weight=0.0, dice_weight=1.0))(logits, target)
    assert loss.item() < 1e-3


def test_dice_ignores_ignored_pixels() -> None:
    logits, target = logits_and_target()
    loss_fn = build_loss(LossConfig(ce_weight=0.0, dice_weight=1.0))
    cut = target.clone()
    cut[:, :8] = -100
    torch.testing.assert_close(
        loss_fn(logits, cut), loss_fn(logits[:, :, 8:].detach(), target[:, 8:])
    )


def test_mixing_is_the_weighted_sum() -> None:
    logits, target = logits_and_target()
    ce = build_loss(LossConfig())(logits, target)
    dice = build_loss(LossConfig(ce_weight=0.0, dice_weight=1.0))(logits, target)
    mixed = build_loss(LossConfig(ce_weight=0.7, dice_weight=0.3))(logits, target)
    torch.testing.assert_close(mixed, 0.7 * ce + 0.3 * dice)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_give_a_finite_float32_loss(dtype: torch.dtype) -> None:
    logits, target = logits_and_target()
    big = (logits.detach() * 300).to(dtype).requires_grad_()  # would overflow a half softmax sum
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = build_loss(LossConfig(dice_weight=1.0))(big, target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert big.grad is not None and torch.isfinite(big.grad).all()


def test_shape_and_class_count_errors() -> None:
    logits, target = logits_and_target(c=4)
    loss_fn = build_loss(LossConfig())
    with pytest.raises(ValueError, match="class_weights"):
        loss_fn(logits, target)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        loss_fn(logits[:, :3], target[:, :8])


def test_weights_follow_the_loss_to_a_device() -> None:
    loss_fn = build_loss(LossConfig(dice_weight=1.0))
    assert isinstance(loss_fn, SegmentationLoss)
    assert "class_weights" not in loss_fn.state_dict()  # rebuilt from the config, not saved
    # .to() moves the weights (a buffer): "meta" is a real device type with no storage, so this
    # shows the move without a GPU (autocast has no meta backend, so the loss itself runs on CUDA
    # in the gpu test below).
    loss_fn.to("meta")
    assert loss_fn.class_weights.device.type == "meta"


@pytest.mark.gpu
def test_loss_on_cuda_equals_the_cpu_loss() -> None:
    logits, target = logits_and_target()
    target[0, :4] = -100
    loss_fn = build_loss(LossConfig(dice_weight=0.5))
    cpu = loss_fn(logits, target)
    gpu = loss_fn.to("cuda")(logits.detach().cuda(), target.cuda())
    assert loss_fn.class_weights.device.type == "cuda" and gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu.detach(), rtol=1e-5, atol=1e-6)


def test_median_frequency_balancing() -> None:
    w = class_weights_from_frequencies([0.8, 0.15, 0.05])
    raw = [0.15 / 0.8, 1.0, 3.0]
    assert w == pytest.approx([r / sum(raw) for r in raw])
    assert sum(w) == pytest.approx(1.0)


def test_sqrt_balancing_is_milder_and_zero_frequency_gets_no_weight() -> None:
    """``sqrt`` must differ from ``median``: median-frequency weights are inverse frequencies up to
    a constant that normalising removes, so ``inverse`` changed nothing (and still does not)."""
    freqs = [0.8, 0.15, 0.05]
    w = class_weights_from_frequencies(freqs, method="sqrt")
    assert w == pytest.approx([0.1368, 0.3160, 0.5472], abs=1e-4)  # 1/sqrt(f), normalised
    median = class_weights_from_frequencies(freqs)
    assert w[2] / w[0] == pytest.approx(4.0) and median[2] / median[0] == pytest.approx(16.0)
    assert class_weights_from_frequencies(freqs, method="inverse") == pytest.approx(median)
    for method in ("sqrt", "inverse"):
        assert class_weights_from_frequencies([0.5, 0.5, 0.0], method=method) == pytest.approx(
            [0.5, 0.5, 0.0]
        )
    # Frequencies that do not quite sum to 1 (rounding in the manifest) are normalised first.
    assert class_weights_from_frequencies([1.6, 0.3, 0.1]) == pytest.approx(
        class_weights_from_frequencies([0.8, 0.15, 0.05])
    )


@pytest.mark.parametrize("freqs", [[1.0], [0.5, -0.1, 0.6], [0.0, 0.0, 0.0], [math.nan, 1, 0]])
def test_bad_frequencies_are_rejected(freqs: list[float]) -> None:
    with pytest.raises(ValueError, match="class_frequencies"):
        class_weights_from_frequencies(freqs)


def test_manifest_weights() -> None:
    cfg = LossConfig(class_weights="manifest")
    loss_fn = build_loss(cfg, class_frequencies=[0.8, 0.15, 0.05])
    expected = class_weights_from_frequencies([0.8, 0.15, 0.05])
    assert loss_fn.class_weights.tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match="class_frequencies"):
        build_loss(cfg)


def test_config_defaults_and_list_input() -> None:
    assert LossConfig().class_weights == (0.1, 0.8, 0.1)
    assert LossConfig(class_weights=[1, 2, 3]).class_weights == (1.0, 2.0, 3.0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"class_weights": "median"}, "loss.class_weights"),
        ({"class_weights": [0.1, -0.8, 0.1]}, "loss.class_weights"),
        ({"class_weights": [0.0, 0.0]}, "loss.class_weights"),
        ({"ce_weight": -1.0}, "loss.ce_weight"),
        ({"dice_weight": math.inf}, "loss.dice_weight"),
        ({"ce_weight": 0.0}, "loss.ce_weight and loss.dice_weight"),
        ({"dice_weight": 1.0, "dice_smooth": 0.0}, "loss.dice_smooth"),
        ({"ignore_index": 1.5}, "loss.ignore_index"),
        ({"frequency_balancing": "mean"}, "loss.frequency_balancing"),
        ({"focal_gamma": -1.0}, "loss.focal_gamma"),
        ({"focal_gamma": math.nan}, "loss.focal_gamma"),
        ({"focal_gamma": math.inf}, "loss.focal_gamma"),
        ({"focal_gamma": 2.0, "ce_weight": 0.0, "dice_weight": 1.0}, "loss.focal_gamma"),
    ],
)
def test_loss_config_errors_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises((ValueError, TypeError), match=field):
        LossConfig(**kwargs)


@pytest.mark.parametrize("cfg", [LossConfig(class_weights=(0.2, 0.5, 0.3)),
                                 LossConfig(class_weights=(0.2, 0.5, 0.3), dice_weight=0.5),
                                 LossConfig(ce_weight=0.0, dice_weight=1.0, ignore_index=1),
                                 LossConfig(class_weights=(0.2, 0.5, 0.3), focal_gamma=2.0),
                                 LossConfig(class_weights=(0.2, 0.5, 0.3), dice_weight=0.5,
                                            focal_gamma=0.5, ignore_index=1)])
def test_sums_added_over_batches_give_the_loss_of_them_all_at_once(cfg: LossConfig) -> None:
    """Validation adds ``sums`` over batches and ranks: the loss of the whole split, however
    it was cut (here unevenly, one part mostly ignored)."""
    logits, target = logits_and_target(n=3)
    target[0, :12] = -100
    target[2, :, 5:] = -100
    loss_fn = build_loss(cfg)
    whole = loss_fn(logits, target)
    parts = loss_fn.sums(logits[:1], target[:1]) + loss_fn.sums(logits[1:], target[1:])
    assert parts.dtype == torch.float64 and not parts.requires_grad
    assert loss_fn.from_sums(parts) == pytest.approx(whole.item(), rel=1e-6)
    # while a mean of the parts' losses is not that loss
    mean = (loss_fn(logits[:1], target[:1]) + 2 * loss_fn(logits[1:], target[1:])) / 3
    assert abs(mean.item() - whole.item()) > 1e-3


def test_sums_of_nothing_valid_give_0() -> None:
    logits, target = logits_and_target()
    loss_fn = build_loss(LossConfig(dice_weight=0.5))
    assert loss_fn.from_sums(loss_fn.sums(logits, torch.full_like(target, -100))) == 0.0


def _old_weighted_ce(logits: torch.Tensor, target: torch.Tensor,
                     weights: tuple[float, ...]) -> torch.Tensor:
    """The CE term as it was before loss.focal_gamma, step for step (ignore_index -100)."""
    w = torch.tensor(weights)
    per_pixel = nn.functional.cross_entropy(logits.float(), target, weight=w, ignore_index=-100,
                                            reduction="none")
    valid = target != -100
    den = (w[torch.where(valid, target, 0)] * valid).sum()
    return per_pixel.sum() / den.clamp_min(torch.finfo(torch.float32).tiny)


def test_focal_gamma_0_is_the_weighted_ce_bit_for_bit() -> None:
    logits, target = logits_and_target()
    target[0, :4] = -100
    weights = (0.2, 0.5, 0.3)
    loss = build_loss(LossConfig(class_weights=weights, focal_gamma=0.0))(logits, target)
    (grad,) = torch.autograd.grad(loss, logits)
    ref = _old_weighted_ce(logits, target, weights)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    assert torch.equal(loss, ref) and torch.equal(grad, ref_grad)  # not merely close


def _focal_by_hand(logits: torch.Tensor, target: torch.Tensor, weights: tuple[float, ...],
                   gamma: float, ignore_index: int) -> float:
    """Lin et al.'s formula pixel by pixel, in float64 Python: sum over valid pixels of
    ``w_t (1 - p_t) ** gamma * -log p_t``, over the sum of their ``w_t``."""
    num = den = 0.0
    n, c, h, w = logits.shape
    for i in range(n):
        for y in range(h):
            for x in range(w):
                t = int(target[i, y, x])
                if t in (ignore_index, -100):
                    continue
                z = [float(logits[i, k, y, x]) for k in range(c)]
                top = max(z)
                p_t = math.exp(z[t] - top) / sum(math.exp(v - top) for v in z)
                num += weights[t] * (1 - p_t) ** gamma * -math.log(p_t)
                den += weights[t]
    return num / den


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 3.5])
@pytest.mark.parametrize("ignore_index", [-100, 1])
def test_focal_against_the_per_pixel_formula(gamma: float, ignore_index: int) -> None:
    logits, target = logits_and_target(size=8, seed=3)
    logits = (logits.detach() * 3).requires_grad_()  # some pixels confident, some badly wrong
    target[0, :2] = -100  # the loader's padding: ignored whatever loss.ignore_index is
    target[1, :, :3] = ignore_index
    weights = (0.2, 0.5, 0.3)
    loss_fn = build_loss(LossConfig(class_weights=weights, focal_gamma=gamma,
                                    ignore_index=ignore_index))
    loss = loss_fn(logits, target)
    expected = _focal_by_hand(logits.detach(), target, weights, gamma, ignore_index)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # below plain CE (every factor (1 - p_t) ** gamma < 1), and the ignored pixels get no gradient
    ce = build_loss(LossConfig(class_weights=weights, ignore_index=ignore_index))(logits, target)
    assert loss.item() < ce.item()
    loss.backward()
    ignored = (target == -100) | (target == ignore_index)
    assert torch.all(logits.grad.permute(0, 2, 3, 1)[ignored] == 0)
    # the gradient the paper's loss has (its factor (1 - p_t) ** gamma differentiated too, not
    # held as a constant), from the same formula written with float64 torch ops
    x = logits.detach().double().requires_grad_()
    safe = torch.where(ignored, 0, target).unsqueeze(1)
    p_t = x.softmax(1).gather(1, safe).squeeze(1)
    w = torch.tensor(weights, dtype=torch.float64)[safe.squeeze(1)] * ~ignored
    ((w * (1 - p_t) ** gamma * -p_t.log()).sum() / w.sum()).backward()
    torch.testing.assert_close(logits.grad, x.grad.float(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_focal_gradients_are_finite_at_extreme_logits(gamma: float,
                                                      autocast: torch.dtype | None) -> None:
    """p_t = 1 to float precision (true class 2 ** 15 above the rest, a bf16 number: (1 - p_t)
    ** gamma has an infinite derivative there for gamma < 1) and p_t = 0 (2 ** 15 below), beside
    an ordinary pixel, in float32 and as bf16 logits under autocast."""
    base = torch.zeros(1, 3, 1, 4)
    base[0, 0, 0, 0] = 2.0**15  # target 0: p_t = 1
    base[0, 0, 0, 1] = -(2.0**15)  # target 0: p_t = 0
    base[0, :, 0, 2] = torch.tensor([0.3, -0.2, 0.1])  # target 1: ordinary
    base[0, 2, 0, 3] = 2.0**15  # target 2 on an ignored pixel: no part in the loss or its gradient
    target = torch.tensor([[[0, 0, 1, -100]]])
    logits = base.to(autocast or torch.float32).requires_grad_()
    loss_fn = build_loss(LossConfig(class_weights=(0.2, 0.5, 0.3), focal_gamma=gamma))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
        loss = loss_fn(logits, target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # the p_t = 0 pixel: (1 - 0) ** gamma * (2 ** 15 + ln 2) (the ordinary pixel adds ~1 at most)
    assert loss.item() == pytest.approx(0.2 * 2**15 / 0.9, rel=1e-3)
    loss.backward()
    grad = logits.grad.float()
    assert torch.isfinite(grad).all()
    assert torch.all(grad[..., 0] == 0) and torch.all(grad[..., 3] == 0)  # p_t = 1; ignored
    assert grad[0, 0, 0, 1] < 0 and grad[0, 1, 0, 2] < 0  # the true class pushed up


def test_focal_gamma_trains_the_tiny_preset(small_dataset: Path, tmp_path: Path) -> None:
    """configs/tiny.toml with loss.focal_gamma=2 from the command line's syntax: the trainer
    builds the focal loss and its loss goes down (as test_trainer's plain-CE run shows)."""
    from trainer.config import load_config
    from trainer.dist import DistEnv
    from trainer.trainer import Trainer

    cfg = load_config(Path("configs/tiny.toml"), ["loss.focal_gamma=2", "train.epochs=6",
                                                  "train.val_every=0", "data.num_threads=1"])
    t = Trainer(cfg, DistEnv(), small_dataset, tmp_path / "run", device=torch.device("cpu"))
    assert t.loss_fn.focal_gamma == 2.0
    t.train()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert log[-1]["train_loss"] < 0.8 * log[0]["train_loss"]
