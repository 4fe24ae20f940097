"""Model registry and config: build a network by name, then apply channels_last and compile.

An unknown name or option is an error that lists what is known (segmentation_models.pytorch's
``create_model`` does the same).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from models.blocks import NORMS
from models.unet import PAD_MODES, unet, unet_baseline

ModelFactory = Callable[..., nn.Module]

# NOTE: every factory takes (in_channels, num_classes, **options); its keyword parameters are the
# options build_model accepts, so a typo in a config key fails loudly instead of being ignored.
_REGISTRY: dict[str, ModelFactory] = {}

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def register_model(name: str, factory: ModelFactory) -> None:
    """Add ``factory`` under ``name``; names are unique."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = factory


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_REGISTRY)


register_model("unet_baseline", unet_baseline)
register_model("unet", unet)


def _options_of(factory: ModelFactory) -> list[str]:
    params = list(inspect.signature(factory).parameters)
    return [p for p in params if p not in ("in_channels", "num_classes")]


def build_model(name: str, in_channels: int, num_classes: int, **options: object) -> nn.Module:
    """Build the registered model ``name``: float NCHW in, logits NCHW of the same H and W out.

    ``options`` go to the model's factory (for the U-Nets: ``width_divisor``, ``pad_mode``,
    ``norm``).
    """
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(list_models())} "
            "(set model.name in the config)"
        )
    factory = _REGISTRY[name]
    accepted = _options_of(factory)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"model {name!r} does not take option(s) {unknown}; it takes {accepted}"
        )
    return factory(in_channels, num_classes, **options)


@dataclass
class ModelConfig:
    """The ``[model]`` section of a config: which network, how wide, and how it is run."""

    name: str = "unet_baseline"
    # Divides every width (4: 32..512 -> 8..128); small presets and the CPU demo use it.
    width_divisor: int = 1
    # torch.compile the model (see compile_model); off by default because the first steps then
    # spend tens of seconds compiling, which only pays off on long GPU runs.
    compile: bool = False
    compile_mode: str = "default"
    # "inductor" for real runs; "aot_eager"/"eager" help bisect a compile problem.
    compile_backend: str = "inductor"
    # NHWC weights: faster convolutions with tensor cores under AMP on recent GPUs.
    channels_last: bool = False
    # How the input is padded to a multiple of 16 (see models.blocks.pad_to_multiple).
    pad_mode: str = "reflect"
    # "batch" as the original; "group" for small per-GPU batches (and batch-independent outputs).
    norm: str = "batch"

    def __post_init__(self) -> None:
        if self.name not in _REGISTRY:
            raise ValueError(
                f"model.name={self.name!r} is unknown; known models: {', '.join(list_models())}"
            )
        if isinstance(self.width_divisor, bool) or not isinstance(self.width_divisor, int):
            raise TypeError(f"model.width_divisor must be an int, got {self.width_divisor!r}")
        if self.width_divisor < 1:
            raise ValueError(f"model.width_divisor={self.width_divisor} must be >= 1")
        for field_name in ("compile", "channels_last"):
            if not isinstance(getattr(self, field_name), bool):
                raise TypeError(
                    f"model.{field_name} must be true or false, got {getattr(self, field_name)!r}"
                )
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"model.compile_mode={self.compile_mode!r} is not one of {COMPILE_MODES}"
            )
        if not isinstance(self.compile_backend, str) or not self.compile_backend:
            raise ValueError("model.compile_backend must name a torch.compile backend")
        # NOTE: whether the backend exists is this machine's business (a plugin such as
        # torch_tensorrt registers its own), not the config's: check_compile_backend, which
        # trainer.train calls, so that a GPU run's config.json still loads elsewhere.
        if self.pad_mode not in PAD_MODES:
            raise ValueError(f"model.pad_mode={self.pad_mode!r} is not one of {PAD_MODES}")
        if self.norm not in NORMS:
            raise ValueError(f"model.norm={self.norm!r} is not one of {NORMS}")


def check_compile_backend(cfg: ModelConfig) -> None:
    """Raise unless ``cfg.compile_backend`` is a torch.compile backend here (only when compiling).

    NOTE: before the process group: a misspelt backend would otherwise surface on every rank
    after it is up. Only when compiling, as importing dynamo costs seconds.
    """
    if not cfg.compile:
        return
    import torch._dynamo

    if cfg.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ValueError(
            f"model.compile_backend={cfg.compile_backend!r} is not a torch.compile backend "
            f"here; known: {', '.join(torch._dynamo.list_backends())}, and the debugging ones "
            "of torch._dynamo.list_backends(exclude_tags=()), such as aot_eager")


def compile_model(module: nn.Module, cfg: ModelConfig) -> nn.Module:
    """``torch.compile`` ``module`` with the config's mode and backend.

    ``dynamic=None`` lets dynamo specialise on the training crop and mark H, W dynamic only if a
    second size arrives (the last, smaller validation tiles), instead of recompiling per size.
    """
    return torch.compile(module, mode=cfg.compile_mode, backend=cfg.compile_backend, dynamic=None)


def build_model_from_config(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    """Build ``cfg.name``, convert to channels_last and compile as the config asks.

    The result lives on the CPU; ``.to(device)`` keeps the memory format. A compiled model is a
    wrapper whose ``state_dict`` keys start with ``_orig_mod.``; checkpoint :func:`unwrap_model`.
    """
    model = build_model(
        cfg.name, in_channels, num_classes, width_divisor=cfg.width_divisor, pad_mode=cfg.pad_mode,
        norm=cfg.norm,
    )
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model = compile_model(model, cfg)
    return model


def unwrap_model(module: nn.Module) -> nn.Module:
    """Strip DDP (``.module``) and torch.compile (``._orig_mod``) wrappers, in any order."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module
