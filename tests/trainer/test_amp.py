"""trainer.amp: which precision ``train.amp`` resolves to on a device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer import amp


def _cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (the project runs on Linux only)."""
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    return {f for line in lines if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def test_native_bf16_is_what_the_cpu_flags_say() -> None:
    flags = _cpu_flags()
    assert amp.cpu_has_native_bf16() == bool({"avx512_bf16", "amx_tile"} & flags)


@pytest.mark.parametrize(("avx512_bf16", "amx", "want"), [
    (True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, None)])
def test_auto_on_a_cpu_is_bf16_only_where_native(monkeypatch: pytest.MonkeyPatch,
                                                 avx512_bf16: bool, amx: bool,
                                                 want: torch.dtype | None) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    p = amp.resolve("auto", torch.device("cpu"))
    assert p.dtype is want and p.scaler() is None


def test_forced_modes_and_fp16_needs_cuda() -> None:
    cpu = torch.device("cpu")
    assert amp.resolve("off", cpu).name == "fp32"
    assert amp.resolve("bf16", cpu).name == "bf16"
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        amp.resolve("fp16", cpu)
    with pytest.raises(ValueError, match="choose auto"):
        amp.resolve("fp8", cpu)


def test_a_forced_mode_takes_a_grad_scaler_for_fp16_only() -> None:
    """(fp16 gradients underflow without one; bf16 has fp32's range and needs none)"""
    gpu = torch.device("cuda", 0)  # resolve only names it: no GPU needed
    fp16 = amp.resolve("fp16", gpu)
    assert (fp16.dtype, fp16.use_scaler) == (torch.float16, True)
    for mode, dtype in (("bf16", torch.bfloat16), ("off", None)):
        for device in (gpu, torch.device("cpu")):
            p = amp.resolve(mode, device)
            assert (p.dtype, p.device_type, p.use_scaler) == (dtype, device.type, False)


@pytest.mark.parametrize(("major", "want"), [(8, "bf16"), (7, "fp16")])
def test_auto_on_a_gpu_is_bf16_from_ampere_and_fp16_before(monkeypatch: pytest.MonkeyPatch,
                                                           major: int, want: str) -> None:
    """(torch's default check says yes to bf16 before Ampere too, where it is only emulated)"""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(
        major=major))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda d: True)  # emulated
    p = amp.resolve("auto", torch.device("cuda", 0))
    assert p.name == want and p.use_scaler == (want == "fp16")


def test_ranks_whose_auto_resolves_differently_are_refused_before_ddp(
        monkeypatch: pytest.MonkeyPatch, small_dataset: Path, tmp_path: Path) -> None:
    """A job over an Ampere node (auto: bf16) and an older one (auto: fp16 + GradScaler): the
    scaler's overflow skips would be the fp16 ranks' alone, their weights parting from the
    others'. Every rank sees the same gathered names, so every rank refuses (here rank 1's is
    faked: one process, no GPU)."""
    from trainer import trainer as trainer_mod
    from trainer.config import load_config
    from trainer.dist import DistEnv

    gathered: list[object] = []

    def two_ranks(obj: object) -> list[object]:
        gathered.append(obj)
        return [obj, "fp16"]

    monkeypatch.setattr(trainer_mod, "gather_objects", two_ranks)
    cfg = load_config(Path("configs/tiny.toml"), ["train.amp=off", "train.val_every=0"])
    with pytest.raises(ValueError, match=r"train\.amp=off gives the ranks different precisions "
                                         r"\(rank 0: fp32, rank 1: fp16\)"):
        trainer_mod.Trainer(cfg, DistEnv(), small_dataset, tmp_path / "run",
                            device=torch.device("cpu"))
    assert gathered == ["fp32"]
