"""Config: presets, overrides, and errors that name the key, before any process group."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from trainer.config import (
    ConfigError,
    DistConfig,
    OptimConfig,
    build_config,
    load_config,
    load_run_config,
    parse_override,
    read_config,
    unused_settings,
)

CONFIGS = sorted(Path("configs").glob("*.toml"))


def test_presets_exist_and_load() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"tiny", "demo", "unet_baseline", "unet"} <= names
    for path in CONFIGS:
        cfg = load_config(path)
        assert cfg.model.name in ("unet", "unet_baseline")
    assert load_config(Path("configs/unet.toml")).model.name == "unet"
    assert load_config(Path("configs/unet_baseline.toml")).optim.lr == 5e-4


def test_overrides_apply_with_toml_values_or_bare_words() -> None:
    cfg = load_config(Path("configs/tiny.toml"),
                      ["train.epochs=7", "data.backend=torch", "optim.lr=1e-3",
                       "loss.class_weights=[1, 2, 3]", "model.channels_last=true"])
    assert cfg.train.epochs == 7 and cfg.data.backend == "torch" and cfg.optim.lr == 1e-3
    assert tuple(cfg.loss.class_weights) == (1.0, 2.0, 3.0) and cfg.model.channels_last is True
    assert parse_override("metrics.address=0.0.0.0") == ("metrics", "address", "0.0.0.0")
    # spaces around the = (and the dot) go, for bare words as for TOML values
    assert parse_override("train.amp = bf16") == ("train", "amp", "bf16")
    assert parse_override(" train . epochs = 3 ") == ("train", "epochs", 3)
    assert load_config(None, ["data.backend = torch"]).data.backend == "torch"
    assert load_config(Path("configs/tiny.toml"), ["metrics.port=65535"]).metrics.port == 65535
    for address in ("0.0.0.0", "::1", "localhost", "node-1.cluster.local", "gpu_node01"):
        assert load_config(None, [f"metrics.address={address}"]).metrics.address == address


@pytest.mark.parametrize(("override", "named"), [
    ("train.epoch=3", "train.epoch"),  # typo of a key
    ("trainn.epochs=3", "trainn"),  # unknown section
    ("train.epochs=ten", "train.epochs"),  # wrong type
    ("train.epochs=0", "epochs"),  # out of range
    ("model.name=resnet", "resnet"),  # unknown model: the known ones are listed
    ("data.backend=tensorflow", "backend"),
    ("train.amp=fp8", "amp"),
    ("optim.schedule=step", "schedule"),
    ("metrics.port=70000", "port"),
    ("postproc.building_threshold=2", "building_threshold"),
    # TOML has nan and inf: a NaN grad_clip trained to NaN weights and saved them as best.pt,
    # an infinite (or huge) timeout failed in dist.init on every rank
    ("optim.grad_clip=nan", "optim.grad_clip"),
    ("optim.lr=inf", "optim.lr"),
    ("dist.timeout_s=inf", "dist.timeout_s"),
    ("dist.timeout_s=1e300", "timeout_s"),
    # gloo's own words at the first collective ("wait timeout after 1ms, keys: ..."), unnamed
    ("dist.timeout_s=0.001", "[dist] timeout_s must be in [60, "),
    ("dist.timeout_s=59.9", "got 59.9"),
    ("optim.momentum=-1", "momentum"),
    # found only by building the model, or at the first step, after the process group started
    ("model.width_divisor=3", "width_divisor=3 must divide every width"),
    ("loss.class_weights=[0.5,0.5]", "class_weights has 2 weights"),
    # a bool is an int to Python, not a number of epochs or a learning rate
    ("train.epochs=true", "train.epochs"),
    ("optim.lr=true", "optim.lr"),
    ('loss.class_weights=["a", "b", "c"]', "loss.class_weights"),
    # (was "matches none of tuple[float, ...] | list[float] | str")
    ('loss.class_weights=[0.1, "0.8", 0.1]', "loss.class_weights[1]: expected float, got '0.8'"),
    ("loss.class_weights=1", "loss.class_weights: expected a list of float or str, got 1"),
    # torch's CPU generator and numpy keep 32 bits: 2**33 trained exactly like seed 0
    ("train.seed=8589934592", "[train] seed must be in [0, 4294967295]"),
    ("train.seed=-1", "[train] seed must be in [0, 4294967295]"),
    ("data.seed=9223372036854775808", "data.seed must be in [0, 4294967295]"),  # DALI's build
    ("train.val_every=-1", "val_every"),  # (it meant "never validate", without a word)
    # failed on rank 0 only when it began serving, after the process group, unnamed
    ("metrics.address=", "[metrics] address '' is not an IP address or a host name"),
    ("metrics.address=http://0.0.0.0:9100", "address 'http://0.0.0.0:9100' is not an IP"),
    ("metrics.address=my host", "address 'my host' is not an IP"),
])
def test_bad_values_name_the_key(override: str, named: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(Path("configs/tiny.toml"), [override])
    assert named in str(e.value)


def test_nan_fails_the_optimizer_checks_made_in_code() -> None:
    """The dataclass checks hold without the TOML layer too (NaN fails every comparison)."""
    for bad in ({"grad_clip": math.nan}, {"weight_decay": math.nan}, {"momentum": math.nan},
                {"lr": math.inf}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            OptimConfig(**bad)
    with pytest.raises(ValueError, match="timeout_s"):
        DistConfig(timeout_s=math.inf)
    assert DistConfig(timeout_s=60).timeout_s == 60  # the bound itself is allowed


def test_an_unknown_override_key_names_set_not_the_file() -> None:
    with pytest.raises(ConfigError, match=r"^--set 'train.bogus=1': unknown key train\.bogus"):
        load_config(Path("configs/tiny.toml"), ["train.bogus=1"])
    with pytest.raises(ConfigError, match=r"^--set 'trainn.epochs=3': unknown section"):
        load_config(Path("configs/tiny.toml"), ["trainn.epochs=3"])


def test_a_bad_override_value_names_set_not_the_file(tmp_path: Path) -> None:
    """'configs/tiny.toml: train.epochs: expected int' sent the user looking in a file that did
    not hold the value (tiny.toml has epochs = 2); the value came from --set."""
    with pytest.raises(ConfigError, match=r"^--set 'train.epochs=ten': train\.epochs: expected "
                                          r"int, got 'ten'$"):
        load_config(Path("configs/tiny.toml"), ["train.epochs=ten"])
    # a value of the right type that the section refuses names the file and the overrides
    with pytest.raises(ConfigError, match=r"^configs/tiny\.toml with --set train\.epochs=0: "
                                          r"\[train\] epochs must be >= 1, got 0$"):
        load_config(Path("configs/tiny.toml"), ["train.epochs=0"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepochs = 0\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: \[train\] epochs must be >= 1, got 0$"):
        load_config(bad)


def test_unreadable_config_files_name_the_file(tmp_path: Path) -> None:
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    for path in (tmp_path, binary):
        with pytest.raises(ConfigError, match=f"--config {path}: cannot read"):
            load_config(path)


def test_a_preset_saved_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    """(Notepad's UTF-8 starts with one; tomllib said 'Invalid statement (at line 1, column 1)')"""
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + Path("configs/tiny.toml").read_bytes())
    assert load_config(bom) == load_config(Path("configs/tiny.toml"))


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["epochs=3"])


@pytest.mark.parametrize("text", ["[1, 2]", "3", "null", '"model"'])
def test_a_run_config_that_is_no_json_object_names_the_file(tmp_path: Path, text: str) -> None:
    """(a JSON list in RUN/config.json was an AttributeError traceback in trainer.predict)"""
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=f"{tmp_path / 'config.json'}: not a run's config"):
        load_run_config(tmp_path)


def test_resolved_config_round_trips_through_json() -> None:
    cfg = load_config(Path("configs/demo.toml"), ["train.epochs=3"])
    again = build_config(json.loads(cfg.to_json()), "config.json")
    assert again == cfg


@pytest.mark.parametrize("crop", [1, 16])
def test_batch_norm_with_one_tiny_crop_per_step_is_refused_naming_the_keys(crop: int) -> None:
    """A batch of one crop of <= 16 px reaches unet_baseline's centre as 1x1: BatchNorm stopped
    the first step with torch's "Expected more than 1 value per channel when training", after
    the process group and the loaders had started."""
    bad = ["data.batch_size=1", f"data.crop_size={crop}"]
    with pytest.raises(ConfigError, match=rf"data\.batch_size=1 with data\.crop_size={crop} "
                                          r"leaves BatchNorm one value per channel.*"
                                          r"data\.crop_size > 16.*model\.norm"):
        load_config(Path("configs/tiny.toml"), bad)
    for fine in ("data.crop_size=17", "data.crop_size=0", "model.norm=group",
                 "data.batch_size=2"):  # (the last --set of a key wins)
        load_config(Path("configs/tiny.toml"), [*bad, fine])


def test_a_key_in_the_wrong_place_is_told_where_it_belongs(tmp_path: Path) -> None:
    """'epochs = 3' above every header was called an unknown section; train.lr listed what
    [train] takes without a word that lr is [optim]'s."""
    loose = tmp_path / "loose.toml"
    loose.write_text("epochs = 3\n[model]\nname = \"unet\"\n")
    with pytest.raises(ConfigError, match=rf"^{loose}: key\(s\) epochs come before any \[section\] "
                                          r"header; .*; epochs is a key of \[train\]$"):
        load_config(loose)
    moved = tmp_path / "moved.toml"
    moved.write_text("[train]\nlr = 1e-3\n")
    with pytest.raises(ConfigError, match=rf"^{moved}: unknown key\(s\) train\.lr; \[train\] "
                                          r"takes .*; lr is a key of \[optim\]$"):
        load_config(moved)
    with pytest.raises(ConfigError, match=r"^--set 'train\.lr=0\.1': unknown key train\.lr; "
                                          r".*; lr is a key of \[optim\]$"):
        load_config(None, ["train.lr=0.1"])
    with pytest.raises(ConfigError, match=r"; seed is a key of \[data\] and \[train\]$"):
        load_config(None, ["optim.seed=1"])
    with pytest.raises(ConfigError, match=r"unknown section 'training'.*epochs is a key of "
                                          r"\[train\]$"):
        load_config(None, ["training.epochs=1"])
    with pytest.raises(ConfigError, match=r"unknown key train\.bogus; \[train\] takes "
                                          r"[a-z0-9_, ]+$"):
        load_config(None, ["train.bogus=1"])  # (no home: nothing added)


def _unused(path: Path | None, overrides: list[str]) -> list[str]:
    given, where = read_config(path, overrides)
    return unused_settings(build_config(given, where), given)


def test_settings_that_have_no_effect_are_named_when_set() -> None:
    """optim.momentum with Adam, optim.min_lr_ratio with a constant schedule, model.compile_mode
    without compiling: silently ignored, so a user who set one believed it acted."""
    assert _unused(None, ["optim.momentum=0.5"]) == [
        'optim.momentum = 0.5 has no effect: optim.name = "adam" takes none (SGD only)']
    assert _unused(Path("configs/tiny.toml"), ["optim.min_lr_ratio=0.1"]) == [
        'optim.min_lr_ratio = 0.1 has no effect: optim.schedule = "constant" does not decay '
        "(it is the cosine's floor)"]
    # keys idle for one reason share a line
    assert _unused(None, ['model.compile_mode="max-autotune"', "model.compile_backend=eager"]) \
        == ['model.compile_mode = "max-autotune", model.compile_backend = "eager" have no '
            "effect: model.compile = false"]
    for override, named in [("loss.dice_smooth=2", "loss.dice_weight = 0"),
                            ("loss.frequency_balancing=sqrt", "loss.class_weights is a list"),
                            ("metrics.address=0.0.0.0", "metrics.port = 0"),
                            ("data.read_ahead=4", 'data.backend = "torch"'),
                            ("postproc.grow_radius=2", "train.val_f1 = false"),
                            ("train.early_stop_start_epoch=3", "train.early_stop_patience = 0")]:
        lines = _unused(None, ["data.backend=torch", "train.val_f1=false", override])
        assert len(lines) == 1 and lines[0].startswith(override.split("=")[0]), lines
        assert named in lines[0]
    assert "train.val_every = 0" in _unused(None, ["train.val_every=0", "train.val_f1=true"])[0]


def test_settings_in_use_and_defaults_are_not_named(tmp_path: Path) -> None:
    # the same keys where they act
    assert _unused(None, ["optim.name=sgd", "optim.momentum=0.5", "optim.schedule=cosine",
                          "optim.min_lr_ratio=0.1", "loss.dice_weight=1", "loss.dice_smooth=2",
                          "loss.class_weights=manifest", "loss.frequency_balancing=sqrt",
                          "metrics.port=9100", "metrics.address=0.0.0.0",
                          "data.read_ahead=4", "postproc.grow_radius=2",
                          "train.early_stop_patience=2", "train.early_stop_start_epoch=3"]) == []
    # the dataclass defaults: momentum 0.9 with Adam, min_lr_ratio with the constant schedule
    assert _unused(None, []) == [] and _unused(None, ["optim.name=adamw"]) == []
    for path in CONFIGS:  # no preset carries a key it does not use
        assert _unused(path, []) == [], path
    # a preset is as much the user's setting as --set
    preset = tmp_path / "preset.toml"
    preset.write_text("[optim]\nname = \"adamw\"\nmomentum = 0.95\n")
    assert _unused(preset, []) == [
        'optim.momentum = 0.95 has no effect: optim.name = "adamw" takes none (SGD only)']


def test_the_largest_seed_is_allowed_and_one_more_would_alias_another() -> None:
    """The bound is where torch's CPU generator (the initial weights) starts to wrap."""
    cfg = load_config(Path("configs/tiny.toml"), ["train.seed=4294967295", "data.seed=4294967295"])
    assert cfg.train.seed == cfg.data.seed == 2**32 - 1
    draws = []
    for seed in (0, 2**32):
        torch.manual_seed(seed)
        draws.append(torch.rand(3))
    assert torch.equal(*draws)  # what the refused seeds did: 2**32 trained like 0
