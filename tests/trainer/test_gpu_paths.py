"""The trainer's CUDA paths, which the CPU suite cannot reach: fp16 with a real GradScaler and
bf16 autocast on the GPU, the DALI GPU pipeline, channels_last, the weight EMA on the device,
the focal loss under CUDA autocast, and a GPU run's checkpoint read back on the CPU.

Marked ``gpu``: skipped without CUDA (tests/conftest.py). ``_train`` also runs on the CPU (a
CPU device and ``train.amp=off``), which is how its checks were tried where no GPU was.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from models.losses import SegmentationLoss
from trainer import checkpoint as ckpt
from trainer.config import load_config, load_run_config
from trainer.dist import DistEnv
from trainer.predict import load_net
from trainer.trainer import Trainer

# 17 training tiles at data.batch_size=4: 5 optimizer steps an epoch (configs/tiny.toml)
GPU_RUN = ["train.epochs=1", "train.val_every=1", "train.val_f1=false", "data.num_threads=1",
           "model.channels_last=true", "train.ema_decay=0.9", "loss.focal_gamma=2"]


def _train(data: Path, run_dir: Path, device: torch.device, amp: str,
           overflow_steps: tuple[int, ...] = ()) -> Trainer:
    """One epoch; the head's gradient made inf on ``overflow_steps`` (1-based backward calls)."""
    cfg = load_config(Path("configs/tiny.toml"), [*GPU_RUN, f"train.amp={amp}"])
    t = Trainer(cfg, DistEnv(), data, run_dir, device=device)
    calls = {"n": 0}

    def overflow(grad: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return grad * float("inf") if calls["n"] in overflow_steps else grad

    t.net.head.weight.register_hook(overflow)
    t.train()
    return t


def _check_run(t: Trainer, device: torch.device, updates: int) -> None:
    assert t.ema is not None and t.ema.updates == updates
    for name, v in t.ema.module.state_dict().items():
        assert v.device.type == device.type, name
        assert v.dtype == (torch.int64 if name.endswith("num_batches_tracked") else torch.float32)
        assert bool(torch.isfinite(v.float()).all()), name
    conv = t.ema.module.head.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)  # (the deepcopy kept it)
    last = t.history[-1]
    assert math.isfinite(last["val_loss"]) and 0.0 <= last["val_iou"] <= 1.0
    # a GPU run's checkpoint is read and built on the CPU (trainer.predict, trainer.export)
    path = ckpt.list_checkpoints(t.run_dir)[-1]
    net, _, ema = load_net(path, load_run_config(t.run_dir), t.manifest.bands, "the run")
    assert ema and {p.device.type for p in net.state_dict().values()} == {"cpu"}


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_a_gpu_run_keeps_an_fp32_ema_on_the_device_and_validates(small_dataset: Path,
                                                                 tmp_path: Path, amp: str) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    t = _train(small_dataset, tmp_path / amp, device, amp)
    assert t.precision.name == amp and (t.scaler is not None) == (amp == "fp16")
    assert t.global_step == 5
    # (fp16: a step whose scaled gradients overflow is skipped, and not averaged in; the first
    # steps at the scaler's initial 2 ** 16 may be)
    skipped = 0 if t.scaler is None else round(math.log2(2.0**16 / t.scaler.get_scale()))
    _check_run(t, device, 5 - max(skipped, 0))


@pytest.mark.gpu
def test_the_cuda_grad_scalers_skipped_steps_are_not_averaged_in(small_dataset: Path,
                                                                 tmp_path: Path) -> None:
    """The real fp16 GradScaler on CUDA (the CPU test fakes one): steps 2 and 4 overflow."""
    device = torch.device("cuda", torch.cuda.current_device())
    t = _train(small_dataset, tmp_path / "run", device, "fp16", overflow_steps=(2, 4))
    assert t.global_step == 5 and t.nonfinite_run == 0 and t.scaler is not None
    assert t.scaler.get_scale() <= 2.0**14  # (two halvings; more if a real overflow came too)
    _check_run(t, device, 5 - round(math.log2(2.0**16 / t.scaler.get_scale())))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_focal_loss_under_cuda_autocast_is_fp32_and_finite(dtype: torch.dtype) -> None:
    """Half-precision logits as the network gives them under autocast, saturated so that p_t
    rounds to 1 (the clamp's case): the loss is float32, finite, as the CPU's fp32 one, and so
    are its gradients."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 16, 16) * 4
    logits[0, :, :4] = torch.tensor([60.0, -60.0, -60.0]).view(3, 1, 1)
    target = torch.randint(0, 3, (2, 16, 16))
    target[0, :4] = 0
    target[1, :2] = -100
    loss_fn = SegmentationLoss([0.1, 0.8, 0.1], dice_weight=0.5, focal_gamma=0.5)
    want = loss_fn(logits.to(dtype).float(), target)
    gpu_logits = logits.to("cuda", dtype).requires_grad_()
    with torch.autocast("cuda", dtype=dtype):
        got = loss_fn.to("cuda")(gpu_logits, target.cuda())
    got.backward()
    assert got.dtype == torch.float32 and bool(torch.isfinite(got))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
    assert gpu_logits.grad is not None and bool(torch.isfinite(gpu_logits.grad.float()).all())
