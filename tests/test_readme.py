"""What README tells a user to type is what the code takes: the flags of each command it shows,
every ``--flag`` it names, the config keys, the files, the make targets and variables, and the
U-Nets' downsampling it reasons with. README drifted from the code after many sessions (it once
named two of the three commands that push metrics, and the U-Nets' 16x downsampling as 32x);
these are the classes of drift a test can catch by reading README."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PACKAGES = ("dataio", "trainer", "postproc", "launch", "benchmarks")
# flags README names that belong to torchrun or Slurm, not to a command of this project
FOREIGN = {"--nproc_per_node", "--max-restarts", "--gpus-per-node", "--cpus-per-task", "--time",
           "--signal", "--open-mode", "--requeue", "--no-requeue", "--ntasks-per-node"}
FLAG = r"(?<![\w-])--[a-z][a-z0-9_-]*"
# file names README writes that look like section.key (postproc.json, model.onnx)
FILE_SUFFIXES = {"json", "onnx", "pt", "tif", "toml", "csv", "geojson"}


# README's code: its fenced blocks, and the inline spans of the text between them
BLOCKS = re.findall(r"^```\w*\n(.*?)^```", README, flags=re.S | re.M)
CODE = " ".join([*BLOCKS, *re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", README,
                                                              flags=re.S | re.M))])


class _ParsedError(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def _options(module: str, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The option strings of ``module``'s parser: its ``main`` is stopped where it parses."""
    def stop(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _ParsedError(self)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", stop)
        with pytest.raises(_ParsedError) as parsed:
            importlib.import_module(module).main([])
    return set(parsed.value.parser._option_string_actions)


def _commands() -> dict[str, set[str]]:
    """``python -m MODULE ...`` and ``torchrun ... -m MODULE ...`` in README (code blocks and
    inline code, continuation lines joined): the flags written after each module."""
    text = re.sub(r"\\\n\s*", " ", README)
    mod = rf"-m ((?:{'|'.join(PACKAGES)})\.\w+)"
    found: dict[str, set[str]] = {}
    for line in re.findall(rf"-m (?:{'|'.join(PACKAGES)})\.\w+[^\n`]*", text):
        for module, args in re.findall(rf"{mod}((?:(?!-m )[^|;])*)", line):
            found.setdefault(module, set()).update(re.findall(FLAG, args))
    return found


def test_readme_commands_use_flags_their_module_has(monkeypatch: pytest.MonkeyPatch) -> None:
    commands = _commands()
    assert {"dataio.prepare", "trainer.train", "postproc.merge"} <= set(commands)  # (it parsed)
    wrong = {module: sorted(flags - options) for module, flags in commands.items()
             if flags - (options := _options(module, monkeypatch))}
    assert not wrong, f"README passes flags its modules lack: {wrong}"


def test_every_flag_readme_names_is_one_a_command_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``--flag`` named in prose (`--chip-margin M`, `--strict`) exists in some command."""
    modules = set(_commands()) | {f"{p.parent.name}.{p.stem}" for pkg in PACKAGES[:4]
                                  for p in (ROOT / pkg).glob("*.py")
                                  if "def main(" in p.read_text(encoding="utf-8")}
    known = set().union(*(_options(m, monkeypatch) for m in sorted(modules)))
    named = set(re.findall(FLAG, CODE))
    assert {"--chip-margin", "--strict", "--set"} <= named  # (it parsed)
    assert not named - known - FOREIGN, f"README names flags no command takes: " \
                                        f"{sorted(named - known - FOREIGN)}"


def test_config_keys_readme_names_exist() -> None:
    from trainer.config import Config

    sections = {f.name: {k.name for k in dataclasses.fields(f.default_factory())}
                for f in dataclasses.fields(Config)}
    named = set(re.findall(rf"(?<![\w./])({'|'.join(sections)})\.([a-z_][a-z0-9_]*)", CODE))
    # (postproc.polygonize is a module, and postproc.json or model.onnx a file, not keys)
    named = {(s, k) for s, k in named if k not in FILE_SUFFIXES and not (
        s == "postproc" and (ROOT / "postproc" / f"{k}.py").is_file())}
    assert ("train", "init_from") in named and ("metrics", "port") in named  # (it parsed)
    unknown = sorted(f"{s}.{k}" for s, k in named if k not in sections[s])
    assert not unknown, f"README names config keys that do not exist: {unknown}"


def test_files_readme_names_exist() -> None:
    """The repository's files README points to (scripts, presets, the dashboard, RESULTS)."""
    tops = "|".join([*PACKAGES, "models", "configs", "tests", r"\.ci"])
    # (a pattern, `trainer/predict*.py`, names the files it matches)
    named = set(re.findall(rf"(?<![\w./*-])((?:{tops})/[\w./*-]*\w)", CODE))
    assert {"launch/slurm.sbatch", "configs/unet.toml"} <= named  # (it parsed)
    missing = sorted(n for n in named if not any(ROOT.glob(n)))
    assert not missing, f"README names files the repository lacks: {missing}"


def test_make_targets_and_variables_readme_names_exist() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.M))
    variables = set(re.findall(r"^([A-Z_]+) \?=", makefile, re.M))
    named = re.findall(r"make ([a-z][\w-]*)((?: [A-Z_]+=\S*)*)", README)
    assert {"demo", "test", "setup"} <= {t for t, _ in named}  # (it parsed)
    missing = sorted({t for t, _ in named} - targets)
    assert not missing, f"README names make targets the Makefile lacks: {missing}"
    unset = sorted({v for _, a in named for v in re.findall(r"([A-Z_]+)=", a)} - variables)
    assert not unset, f"README sets make variables the Makefile does not take: {unset}"


def test_the_downsampling_readme_reasons_with_is_the_unets() -> None:
    from models.registry import build_model, list_models

    stated = {int(n) for n in re.findall(r"(\d+)x downsampling", README)}
    assert stated, "README no longer states the U-Nets' downsampling"
    actual = {build_model(name, 3, 3, width_divisor=16).multiple for name in list_models()}
    assert stated == actual, f"README says {stated}x downsampling, the U-Nets pad to {actual}"


def test_readme_lists_every_onnx_metadata_key() -> None:
    """The export section's ``metadata_props`` list is a deployer's reference: it named every key
    of ``trainer.export.METADATA`` but the first, ``footprints.format`` (the version to check)."""
    from trainer.export import METADATA

    section = README.split("### Exporting the model (ONNX)", 1)[1].split("\n## ", 1)[0]
    listed = section.split("- `metadata_props`", 1)[1].split("\n\n", 1)[0]
    assert [k for k in METADATA if f"`{k}`" not in listed] == []


def test_the_file_name_limits_readme_states_are_the_codes() -> None:
    """README's ImageId limit and the temporary name it derives it from: it once said the
    temporary name of ``<ImageId>.geojson`` was 22 bytes longer (it is 14; 22 is the ImageId's
    margin), which gives a limit of 225, not the 233 that prepare enforces."""
    from dataio.atomic import NAME_MAX, TMP_NAME_EXTRA
    from postproc.geojson import GEOJSON_SUFFIX, MAX_IMAGE_ID_BYTES

    text = re.sub(r"\s+", " ", README)
    longer = re.search(r"`<ImageId>\.geojson`,? under a temporary name (\d+) bytes longer", text)
    assert longer, "README no longer states the temporary name's length"
    assert int(longer.group(1)) == TMP_NAME_EXTRA
    spelt = re.search(r"bytes longer, `([^`]+)`, (\d+) bytes more than the ImageId, and a file "
                      r"name has at most (\d+) bytes", text)
    assert spelt, "README no longer spells the temporary name out"
    pattern, margin, name_max = spelt.groups()
    assert len(pattern) - len("<ImageId>") == TMP_NAME_EXTRA + len(GEOJSON_SUFFIX)
    assert int(margin) == TMP_NAME_EXTRA + len(GEOJSON_SUFFIX) == NAME_MAX - MAX_IMAGE_ID_BYTES
    assert int(name_max) == NAME_MAX
    limit = re.search(r"longest chip ImageId, is over (\d+) bytes", text)
    assert limit and int(limit.group(1)) == MAX_IMAGE_ID_BYTES
    # a whole image's ImageId passes the limit when RGB-PanSharpen_<ImageId>.tif does this
    whole = re.search(r"`(RGB-PanSharpen_)<ImageId>(\.tif)`, has (\d+) bytes or more", text)
    assert whole and int(whole.group(3)) == (len(whole.group(1)) + MAX_IMAGE_ID_BYTES + 1
                                              + len(whole.group(2)))
    # the output names check_writable refuses up front, atomic_open's and postproc.mosaic's
    from postproc import mosaic

    out = re.search(r"no room for its temporary name beside it \(over (\d+) bytes; "
                    r"`postproc\.mosaic`'s, (\d+)\)", text)
    assert out, "README no longer states the longest output name"
    assert (int(out.group(1)), int(out.group(2))) == (NAME_MAX - TMP_NAME_EXTRA,
                                                      NAME_MAX - mosaic.TMP_NAME_EXTRA)


def test_config_defaults_readme_states_are_the_configs() -> None:
    """``train.ema_decay = d`` (0, the default, ...), ``train.grad_accum_steps = N`` (default
    1), ``model.pad_mode = "reflect"`` (the default): each default README states for a config
    key is the dataclass's."""
    from trainer.config import Config

    config = Config()
    text = re.sub(r"\s+", " ", README)
    stated = {}
    for section, key, value, note in re.findall(r"`(\w+)\.(\w+) = ([^`]+)` \(([^()]*)", text):
        default = re.match(r"(?:[^;]*; )?(?:default ([^\s);]+)|(\S+), the default\b|the default$)",
                           note)
        if default:
            stated[(section, key)] = (default.group(1) or default.group(2) or value).strip('"')
    assert {("train", "ema_decay"), ("train", "grad_accum_steps"), ("model", "pad_mode"),
            ("loss", "focal_gamma"), ("train", "early_stop_patience"),
            ("train", "early_stop_start_epoch")} <= set(stated), stated  # (it parsed)
    actual = {name: getattr(getattr(config, name[0]), name[1]) for name in stated}
    wrong = {".".join(name): (said, actual[name]) for name, said in stated.items()
             if said != str(actual[name]) and not (
                 isinstance(actual[name], float) and re.fullmatch(r"[\d.e+-]+", said)
                 and float(said) == actual[name])}
    assert not wrong, f"README's default (README, code): {wrong}"
