"""Mixed precision: which autocast dtype and whether a GradScaler, for a device and a mode."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype | None  # None: full fp32
    device_type: str
    use_scaler: bool

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device_type) if self.use_scaler else None


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU computes bf16 natively (elsewhere oneDNN emulates it).

    The feature checks torch's own kernels use; ``get_cpu_capability()`` only names the vector
    width (an AMX CPU reports "AVX512"), so it cannot tell.
    """
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve(mode: str, device: torch.device) -> Precision:
    """``auto``: bf16 where the device does it natively, else fp16 + GradScaler on CUDA; on a CPU
    without native bf16, fp32 (measured here on an AVX2 EPYC: bf16 autocast ran 5-6.5x slower than
    fp32, benchmarks/RESULTS.md). ``bf16``/``fp16``/``off`` force a mode; fp16 needs CUDA."""
    kind = device.type
    if mode == "off":
        return Precision(None, kind, False)
    if mode == "bf16":
        return Precision(torch.bfloat16, kind, False)
    if mode == "fp16":
        if kind != "cuda":
            raise ValueError("train.amp=fp16 needs CUDA (its GradScaler is for GPUs); "
                             "use bf16 or off on a CPU")
        return Precision(torch.float16, kind, True)
    if mode != "auto":
        raise ValueError(f"train.amp={mode!r}: choose auto, bf16, fp16 or off")
    if kind == "cuda":
        # NOTE: not the default including_emulation=True, which says yes before Ampere (V100,
        # T4), where bf16 is emulated and slow: those take fp16 + GradScaler. (The current
        # device: dist.device_for set it.)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return Precision(torch.bfloat16, kind, False)
        return Precision(torch.float16, kind, True)
    return Precision(torch.bfloat16 if cpu_has_native_bf16() else None, kind, False)
