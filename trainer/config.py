"""Training configuration: nested dataclasses, TOML presets, ``--set section.key=value``.

Each section is the config dataclass of the component that uses it (``[model]`` is
``models.ModelConfig``, ``[data]`` is ``dataio.loader.LoaderConfig``, ...). Unknown sections or
keys and values of the wrong type are errors that name the key, raised while parsing, i.e. before
any process group exists; the resolved config is saved as JSON in the run directory.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dataio.classes import NUM_CLASSES
from dataio.loader import MAX_SEED, LoaderConfig
from models import LossConfig, ModelConfig, build_model_from_config
from models.registry import check_compile_backend
from postproc.polygonize import PolygonizeConfig

AMP_MODES = ("auto", "bf16", "fp16", "off")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")


class ConfigError(ValueError):
    """A config problem; the message names the file and/or the key."""


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (the original trained Adam at 5e-4)."""

    name: str = "adam"
    lr: float = 5e-4
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.01  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 0.0  # max global grad norm; 0 = off

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"name {self.name!r}: known optimizers are {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r}: known are {', '.join(SCHEDULES)}")
        # NOTE: written so that NaN fails them: a NaN grad_clip scaled every gradient to NaN
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not (self.warmup_steps >= 0 and 0 <= self.grad_clip < math.inf
                and 0 <= self.weight_decay < math.inf):
            raise ValueError(f"warmup_steps, grad_clip and weight_decay must be finite and >= 0, "
                             f"got {self.warmup_steps}, {self.grad_clip}, {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainConfig:
    """The loop: length, precision, validation, checkpoints, failure handling."""

    epochs: int = 10
    amp: str = "auto"  # auto: bf16 on GPUs that have it, else fp16 + GradScaler; CPU: see amp.py
    seed: int = 0
    val_every: int = 1  # epochs; 0 = never
    val_f1: bool = True  # also polygonize + score the val split (SpaceNet F1) when validating
    checkpoint_every_steps: int = 0  # 0 = only at the end of every epoch
    keep_last: int = 3
    max_nonfinite_steps: int = 10  # consecutive skipped steps before the run stops
    log_every: int = 10  # steps between metric syncs and progress updates
    # Loader batches per optimizer step (gradient accumulation): the step's gradient is the mean
    # of theirs, as one batch of data.batch_size x grad_accum_steps samples would give, in the
    # memory of one batch. The epoch's last step may take fewer (what is left of the epoch).
    grad_accum_steps: int = 1
    # A fresh run's initial weights: a checkpoint file, or a run directory (its best.pt). Only
    # the weights; a run with a checkpoint of its own resumes from it and ignores this.
    init_from: str = ""
    # Stop once the validation score (val_f1, or val_iou with val_f1 off: best.pt's) has not
    # improved for this many validations in a row; 0 = off.
    early_stop_patience: int = 0
    # Keras' start_from_epoch: the validations of the first N epochs do not count towards the
    # patience (a warm-up whose F1 sits at 0 is no reason to stop); they still choose best.pt.
    early_stop_start_epoch: int = 0
    # An exponential moving average of the weights, updated after every optimizer step, with
    # this decay (0 = off; 0.999 or 0.9999 as in timm): validation scores it, and best.pt,
    # trainer.predict and train.init_from use it (trainer/ema.py).
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp {self.amp!r}: choose one of {', '.join(AMP_MODES)}")
        for name in ("epochs", "keep_last", "max_nonfinite_steps", "log_every",
                     "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.val_every < 0 or self.checkpoint_every_steps < 0:
            raise ValueError("val_every and checkpoint_every_steps must be >= 0")
        # NOTE: torch's CPU generator (which draws the initial weights) keeps the low 32 bits
        # of its seed and numpy's legacy seed takes 32 bits: seed 2**33 trained exactly like
        # seed 0, and -1 like 2**32-1. Refuse what would silently alias another seed.
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, {MAX_SEED}] (torch and numpy keep 32 bits "
                             f"of it), got {self.seed}")
        # (1 never moves from its start; a negative or larger one extrapolates, not averages)
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (0 = off; e.g. 0.999), got "
                             f"{self.ema_decay}")
        if self.early_stop_patience < 0:
            raise ValueError(f"early_stop_patience must be >= 0 (0 = off), got "
                             f"{self.early_stop_patience}")
        if self.early_stop_start_epoch < 0:
            raise ValueError(f"early_stop_start_epoch must be >= 0 (0 = every validation "
                             f"counts), got {self.early_stop_start_epoch}")
        # (a patience without validations would never count one: the run trained its epochs)
        if self.early_stop_patience > 0 and self.val_every == 0:
            raise ValueError(f"early_stop_patience = {self.early_stop_patience} counts "
                             "validations and val_every = 0 never validates; set "
                             "train.val_every >= 1 or train.early_stop_patience = 0")
        if self.early_stop_patience > 0 and self.early_stop_start_epoch >= self.epochs:
            raise ValueError(f"early_stop_start_epoch = {self.early_stop_start_epoch} counts "
                             f"no validation of a run of epochs = {self.epochs}, so "
                             f"early_stop_patience = {self.early_stop_patience} never stops "
                             "it; set train.early_stop_start_epoch < train.epochs or "
                             "train.early_stop_patience = 0")


@dataclass
class MetricsConfig:
    """Prometheus endpoint served by rank 0."""

    port: int = 0  # 0 = off
    # NOTE: loopback by default: metrics reveal paths and hostnames and the endpoint has no
    # auth; bind 0.0.0.0 (or the node's cluster address) deliberately when Prometheus scrapes
    # from another machine.
    address: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        # NOTE: only the form; whether the name resolves is the node's business. A malformed
        # address ('', a URL, a typo with a space) failed on rank 0 only when it started
        # serving, after the process group, the model and the loaders, without naming the key.
        if not _is_address(self.address):
            raise ValueError(f"address {self.address!r} is not an IP address or a host name "
                             "(e.g. 127.0.0.1, 0.0.0.0, ::1, node01.cluster)")


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _is_address(text: str) -> bool:
    """An IPv4/IPv6 address or a host name (RFC 1123 labels; '_' too, as some clusters use)."""
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        pass
    labels = text[:-1].split(".") if text.endswith(".") else text.split(".")
    return 0 < len(text) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)


MAX_TIMEOUT_S = 365 * 86400.0  # far beyond any collective; inside timedelta and c10d's ms
# NOTE: every collective waits out the other ranks' work in between: rank 0 alone writing a
# checkpoint (hundreds of MB for the wide U-Net), an uneven share of validation, the first
# compiled step (~20 s), a rank still importing at start. A timeout shorter than those stopped
# a healthy run in gloo's words ("Timed out waiting 1000ms for send operation to complete",
# "wait timeout after 50ms, keys: /footprints/attempt_0/...", with a C++ stack), never naming
# dist.timeout_s; a fraction of a second (0.001: seconds taken for milliseconds) failed at once.
MIN_TIMEOUT_S = 60.0


@dataclass
class DistConfig:
    backend: str = "auto"  # auto: nccl with CUDA, gloo without
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"backend {self.backend!r}: choose auto, nccl or gloo")
        # (inf, or beyond a timedelta, failed only in dist.init, on every rank)
        if not MIN_TIMEOUT_S <= self.timeout_s <= MAX_TIMEOUT_S:
            raise ValueError(f"timeout_s must be in [{MIN_TIMEOUT_S:.0f}, {MAX_TIMEOUT_S:.0f}] "
                             f"s (it bounds every collective, including the waits for rank 0's "
                             f"checkpoint writes), got {self.timeout_s}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: LoaderConfig = field(default_factory=LoaderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    postproc: PolygonizeConfig = field(default_factory=PolygonizeConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """Check (and gently coerce: int -> float, list -> tuple) a TOML value against a type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for alt in typing.get_args(hint):
            try:
                return _check_type(key, value, alt)
            except ConfigError as e:
                errors.append(str(e))
        # NOTE: a list with one bad item names the item ('loss.class_weights[1]: expected float,
        # got '0.8''), not the union ("matches none of tuple[float, ...] | list[float] | str")
        inner = [e for e in errors if e.startswith(f"{key}[")]
        if inner:
            raise ConfigError(inner[0])
        kinds = " or ".join(dict.fromkeys(_describe(alt) for alt in typing.get_args(hint)))
        raise ConfigError(f"{key}: expected {kinds}, got {value!r}")
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected nothing, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        items = [_check_type(f"{key}[{i}]", v, args[0]) if args else v
                 for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        # TOML has nan and inf; no setting of this trainer means anything by them
        raise ConfigError(f"{key}: {value!r} is not a finite number")
    if hint in (int, float, str, bool):
        if type(value) is not hint:
            raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
        return value
    return value


def _describe(hint: Any) -> str:
    """A type hint in a user's words: ``list[float]`` -> 'a list of float'."""
    if typing.get_origin(hint) in (list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return f"a list of {_describe(args[0])}" if args else "a list"
    return getattr(hint, "__name__", str(hint))


def _keys(cls: type) -> set[str]:
    """The keys a config section (a dataclass) takes."""
    return {f.name for f in dataclasses.fields(cls) if f.init}


def _home(key: str, besides: str | None = None) -> str:
    """'; lr is a key of [optim]' where a misplaced key belongs (else ''): users moving a key
    between sections (train.lr for optim.lr) were told only what the wrong section takes."""
    homes = [f"[{name}]" for name, part in dataclasses.asdict(Config()).items()
             if name != besides and key in part]
    return f"; {key} is a key of {' and '.join(homes)}" if homes else ""


def _build_section(name: str, cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = _keys(cls)
    unknown = sorted(set(values) - known)
    if unknown:
        homes = "".join(_home(k, besides=name) for k in unknown)
        raise ConfigError(f"{where}: unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                          f"[{name}] takes {', '.join(sorted(known))}{homes}")
    kwargs = {k: _check_type(f"{where}: {name}.{k}", v, hints[k]) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: [{name}] {e}") from None


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, value); the value is read as TOML, else a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value (e.g. train.epochs=5)")
    dotted, raw = text.split("=", 1)
    section, key = (part.strip() for part in dotted.split(".", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        # bare words such as data.backend=torch; stripped as TOML strips a number, so that
        # 'train.amp = bf16' is not refused as amp ' bf16' while 'train.epochs = 3' works
        value = raw.strip()
    return section, key, value


def _check_override(text: str, section: str, key: str, value: Any) -> None:
    """Name ``--set`` (not the TOML file, which need not hold the key at all) when an override's
    key does not exist or its value has the wrong type."""
    if section not in SECTIONS:
        raise ConfigError(f"--set {text!r}: unknown section {section!r}; known: "
                          f"{', '.join(SECTIONS)}{_home(key)}")
    cls = type(getattr(Config(), section))
    known = _keys(cls)
    if key not in known:
        raise ConfigError(f"--set {text!r}: unknown key {section}.{key}; [{section}] takes "
                          f"{', '.join(sorted(known))}{_home(key, besides=section)}")
    _check_type(f"--set {text!r}: {section}.{key}", value, typing.get_type_hints(cls)[key])


def load_config(path: Path | None, overrides: list[str] | None = None) -> Config:
    """Read a TOML preset (or start from defaults), apply overrides, validate everything."""
    return build_config(*read_config(path, overrides))


def read_config(path: Path | None, overrides: list[str] | None = None
                ) -> tuple[dict[str, Any], str]:
    """The keys a user set: the preset's ``{section: {key: value}}`` with the overrides applied
    (their keys and types checked), and where they came from, for :func:`build_config`."""
    raw: dict[str, Any] = {}
    where = str(path) if path else "defaults"
    if path is not None:
        try:
            # NOTE: utf-8-sig: Windows editors (Notepad) start a UTF-8 file with a byte-order
            # mark, which tomllib refused as "Invalid statement (at line 1, column 1)"
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8-sig"))
        except FileNotFoundError:
            raise ConfigError(f"--config {path}: file not found") from None
        except (OSError, UnicodeDecodeError) as e:  # a directory, unreadable, not UTF-8
            raise ConfigError(f"--config {path}: cannot read ({e})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config {path}: not valid TOML ({e})") from None
    for text in overrides or []:
        section, key, value = parse_override(text)
        if "." in key:
            raise ConfigError(f"--set {text!r}: nested keys are not supported")
        _check_override(text, section, key, value)
        raw.setdefault(section, {})[key] = value
    if overrides:  # a section's own checks (ranges) may refuse a value from either
        where = f"{where} with --set {' '.join(overrides)}"
    return raw, where


def build_config(raw: dict[str, Any], where: str) -> Config:
    """Validate a {section: {key: value}} mapping (from TOML, or a run's config.json)."""
    # NOTE: a key above the first [section] header (epochs = 3) is a key, not a section
    loose = sorted(k for k, v in raw.items() if k not in SECTIONS and not isinstance(v, dict))
    if loose:
        raise ConfigError(f"{where}: key(s) {', '.join(loose)} come before any [section] "
                          f"header; put each under its section ({', '.join(SECTIONS)})"
                          f"{''.join(_home(k) for k in loose)}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {', '.join(unknown)}; "
                          f"known: {', '.join(SECTIONS)}")
    parts = {}
    defaults = Config()
    for name in SECTIONS:
        values = raw.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: [{name}] must be a table, got {values!r}")
        parts[name] = _build_section(name, type(getattr(defaults, name)), values, where)
    weights = parts["loss"].class_weights
    if not isinstance(weights, str) and len(weights) != NUM_CLASSES:  # (failed at the 1st step)
        raise ConfigError(f"{where}: [loss] class_weights has {len(weights)} weights; the "
                          f"model gives {NUM_CLASSES} classes (background, building, boundary)")
    # NOTE: what only building the model finds (a width_divisor that does not divide every
    # width) fails here, before any process group or the demo's minutes of data preparation;
    # on the meta device it costs no memory and ~20 ms.
    try:
        with torch.device("meta"):
            net = build_model_from_config(dataclasses.replace(parts["model"], compile=False), 3,
                                          NUM_CLASSES)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: [model] {e}") from None
    _check_batch_norm(parts["model"], parts["data"], getattr(net, "multiple", None), where)
    return Config(**parts)


def _check_batch_norm(model: ModelConfig, data: LoaderConfig, multiple: int | None,
                      where: str) -> None:
    """One sample cropped to at most the network's pad multiple reaches the centre block as 1x1:
    BatchNorm then has one value per channel, and torch stopped the first step with its own words
    ("Expected more than 1 value per channel"), after the process group and the loaders."""
    crop = data.crop_size
    if model.norm != "batch" or data.batch_size != 1 or not multiple or not 0 < crop <= multiple:
        return
    raise ConfigError(
        f"{where}: data.batch_size=1 with data.crop_size={crop} leaves BatchNorm one value per "
        f"channel in {model.name}'s centre block (a crop of {multiple} px or less is pooled to "
        f"1x1); use data.batch_size >= 2, data.crop_size > {multiple} (or 0, whole tiles), or "
        "model.norm = \"group\"")


def unused_settings(cfg: Config, given: dict[str, Any]) -> list[str]:
    """A line for each reason why keys that ``given`` sets (a preset's and ``--set``'s, as
    :func:`read_config` returns them) have no effect in ``cfg``: ``optim.momentum`` with Adam,
    ``optim.min_lr_ratio`` with a constant schedule, ``model.compile_mode`` without compiling.

    NOTE: for ``trainer.train`` to warn about, not refuse: a preset may keep a value for when its
    switch is turned on. Only keys a user set: every dataclass default (momentum 0.9 with the
    default Adam) would otherwise be reported on every run.
    """
    inert = _inert_keys(cfg)
    by_reason: dict[str, list[str]] = {}
    for section, values in given.items():
        for key, value in values.items():
            why = inert.get(f"{section}.{key}")
            if why is not None:
                by_reason.setdefault(why, []).append(f"{section}.{key} = {_toml(value)}")
    return [f"{', '.join(keys)} {'has' if len(keys) == 1 else 'have'} no effect: {why}"
            for why, keys in by_reason.items()]


def _toml(value: Any) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def _inert_keys(cfg: Config) -> dict[str, str]:
    """Keys whose value ``cfg`` does not use, each with the setting that makes it so."""
    optim, loss, data, train = cfg.optim, cfg.loss, cfg.data, cfg.train
    inert: dict[str, str] = {}
    if optim.name != "sgd":
        inert["optim.momentum"] = f"optim.name = {_toml(optim.name)} takes none (SGD only)"
    if optim.schedule != "cosine":
        inert["optim.min_lr_ratio"] = (f"optim.schedule = {_toml(optim.schedule)} does not "
                                       "decay (it is the cosine's floor)")
    if not cfg.model.compile:
        inert["model.compile_mode"] = inert["model.compile_backend"] = "model.compile = false"
    if loss.ce_weight == 0:
        inert["loss.class_weights"] = inert["loss.frequency_balancing"] = (
            "loss.ce_weight = 0 (the class weights weigh the cross entropy only)")
    elif loss.class_weights != "manifest":
        inert["loss.frequency_balancing"] = ("loss.class_weights is a list (it turns the "
                                             "manifest's frequencies into weights)")
    if loss.dice_weight == 0:
        inert["loss.dice_smooth"] = "loss.dice_weight = 0 (no Dice term)"
    if data.backend != "dali":
        inert["data.read_ahead"] = f"data.backend = {_toml(data.backend)} (DALI only)"
        if data.num_threads == 0:
            inert["data.prefetch"] = (f"data.backend = {_toml(data.backend)} with "
                                      "data.num_threads = 0 (no DataLoader workers)")
    if cfg.metrics.port == 0:
        inert["metrics.address"] = "metrics.port = 0 (no endpoint)"
    if train.val_every == 0:
        inert["train.val_f1"] = "train.val_every = 0 (no validation)"
    if train.early_stop_patience == 0:
        inert["train.early_stop_start_epoch"] = ("train.early_stop_patience = 0 (no early "
                                                 "stopping: it says when the patience counts)")
    if train.val_every == 0 or not train.val_f1:
        why = ("train.val_every = 0 (no validation)" if train.val_every == 0 else
               "train.val_f1 = false") + "; [postproc] is the validation F1's polygonizer"
        for name in _keys(PolygonizeConfig):
            inert[f"postproc.{name}"] = why
    return inert


def check_device(cfg: Config, cuda: bool) -> None:
    """What a training config asks of the machine: ``trainer.train`` checks it before the process
    group. (Not in the sections: a GPU run's ``config.json`` must still load on a CPU, where
    ``trainer.predict`` runs it in another precision and without compiling.)"""
    try:
        check_compile_backend(cfg.model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cuda:
        return
    # NOTE: fp16 stopped every rank in the Trainer, after the process group and the model; nccl
    # was refused by the one-GPU-per-process check as "start at most 0" processes.
    if cfg.train.amp == "fp16":
        raise ConfigError("train.amp=fp16 needs CUDA (its GradScaler is for GPUs) and this "
                          "process sees no GPU; use train.amp=auto, bf16 or off")
    if cfg.dist.backend == "nccl":
        raise ConfigError("dist.backend=nccl needs CUDA and this process sees no GPU; use "
                          "dist.backend=auto (gloo without GPUs) or gloo")


def load_run_config(run_dir: Path) -> Config:
    """The resolved config a run saved (``RUN/config.json``), validated again."""
    path = Path(run_dir) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: is {run_dir} a run directory?") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):  # (a list or a number failed in build_config: AttributeError)
        raise ConfigError(f"{path}: not a run's config (a JSON object of sections), got "
                          f"{type(raw).__name__}")
    return build_config(raw, str(path))
