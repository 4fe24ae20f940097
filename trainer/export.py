"""Write a trained run's network as one ONNX file for deployment (onnxruntime, TensorRT).

    python -m trainer.export --checkpoint CKPT_OR_RUN_DIR --out model.onnx [--opset N] [--data DATA]

``--checkpoint`` is a checkpoint file, or a run directory, which means its best checkpoint as
``train.init_from`` resolves it (``checkpoint.source_checkpoint``). The weights are loaded as
``trainer.predict`` loads them (``predict.load_net``), in fp32, with the model settings that the
checkpoint records (its ``config``), and normalised with the percentiles it records (``--data``:
a checkpoint from before the trainer recorded them takes DATA's manifest's, as predict does).

The graph, so that a deployer gets ``trainer.predict``'s probabilities without this repository:

* input ``image``: float32 NCHW, the raw values of the GeoTIFF's bands, in the file's band order
  (band 1 first, as ``dataio.prepare`` reads them and ``img.npy`` holds them: for SpaceNet's
  RGB-PanSharpen the 11-bit uint16 R, G, B), cast to float32. No scaling by the deployer: the
  run's training normalisation, ``clip((x - p2) / (p98 - p2), 0, 1)`` per band with the
  percentiles the checkpoint records, is the graph's first step, as the loader does it.
* output ``probs``: float32 NCHW softmax probabilities, classes background, building, boundary,
  at the input's height and width (``prob.png`` of ``trainer.predict`` is ``round(255 * probs)``
  without ``--tta``, where predict computes in fp32: ``train.amp`` "off", or "auto" on a CPU
  without native bf16; a bf16 or fp16 prediction, a GPU's, differs by its rounding).
* batch, height and width are dynamic. The U-Net halves a tile 4 times, so it needs sides that are
  multiples of 16; the graph pads a tile to that multiple itself (centred, as the model does with
  ``model.pad_mode``) and crops the output back, so any height and width of at least 16 work.
  (Smaller ones: with reflect padding a side of 5 px or less, where the model replicates the
  edge instead, fails in onnxruntime's Pad node; the graph holds no such fallback.)
* ``metadata_props``: the classes, bands, normalisation, model, size constraint and the source
  checkpoint's path, step and sha256 (``METADATA`` keys; lists and numbers as JSON).

Exit code 2 with one line naming the file and the problem: a missing, foreign or damaged
checkpoint, an ``--out`` that cannot be written, an ``--opset`` the exporter cannot give, or the
ONNX packages missing (``pip install -e '.[export]'``). ``--out`` is written atomically: it is
the whole model or left as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from dataio.atomic import atomic_write_bytes, check_writable
from dataio.augment import Normaliser
from dataio.classes import CLASS_NAMES
from dataio.spacenet import DEFAULT_PRODUCT, PRODUCTS
from postproc.pools import ignore_further_sigint, say, stop_code, stop_signals, stopped_by
from trainer import checkpoint as ckpt

if TYPE_CHECKING:
    from trainer.config import Config

PROG = "trainer.export"
INPUT, OUTPUT = "image", "probs"
# NOTE: torch 2.13's exporter writes opset 18 and up; for a lower --opset it converts the graph,
# and for this model that failed ("No Adapter To Version $17 for Pad": the padding to a multiple
# of 16 has sizes computed in the graph) after a traceback, leaving it at 18. (For --opset 99
# it gave 18 after a warning.) Both are refused before the export, and the graph is checked.
MIN_OPSET = 18
FORMAT = 1  # of the metadata: bump on a change a deployer's reader must know about
# The keys of the file's metadata_props, each a string (JSON where it holds a list or number).
METADATA = ("footprints.format", "classes", "bands", "product", "band_order", "input", "output",
            "normalisation", "model", "model_widths", "model_norm", "model_pad_mode",
            "size_multiple", "min_size", "size_constraint", "checkpoint", "checkpoint_step",
            "checkpoint_sha256", "checkpoint_weights")


class Deployable(nn.Module):
    """Raw bands in, probabilities out: the loader's normalisation, the network, the softmax."""

    def __init__(self, net: nn.Module, p2: list[float], p98: list[float]) -> None:
        super().__init__()
        self.net = net
        # NOTE: the loader's own float32 numbers (Normaliser.mean_std, then a float32 reciprocal
        # as augment.transform_image and DALI's crop_mirror_normalize multiply by), so the graph
        # gives the network the input it was trained and validated on, to the last bit.
        mean, std = Normaliser(p2, p98).mean_std()
        self.register_buffer("mean", torch.from_numpy(mean).view(1, -1, 1, 1))
        self.register_buffer("scale", torch.from_numpy(np.float32(1.0) / std).view(1, -1, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = ((image - self.mean) * self.scale).clamp(0.0, 1.0)
        return torch.softmax(self.net(x).float(), dim=1)


def size_multiple(net: nn.Module) -> int:
    """The factor a side must be a multiple of inside the U-Net (2 ** its poolings)."""
    return int(getattr(net, "multiple", 1))


def to_onnx(model: Deployable, bands: int, opset: int | None) -> Any:
    """``model`` as an ``onnx.ModelProto`` with dynamic batch, height and width.

    NOTE: torch.export's graph (``dynamo=True``, torch's default since 2.9; the TorchScript
    exporter is deprecated). The example's sides are not multiples of the U-Net's 16: from a
    tile that is one, the model's "nothing to pad" branch was traced, and onnxruntime failed on
    a 100 x 75 tile (a Concat of 8 and 9 columns); from one that is not, the padding and the crop
    are traced with sizes computed from the input's, and are no-ops on a multiple of 16. Two
    samples, since torch.export specialises a dimension of size 1.
    """
    m = size_multiple(model.net)
    example = torch.zeros(2, bands, 2 * m + 1, 2 * m + 3)
    # NOTE: Dim.DYNAMIC, not named Dims: with named ones torch.export 2.13 failed ("Cannot create
    # Dim with inconsistent min=1, max=-oo") while it composed its suggested fixes; the names are
    # put on the graph's inputs and outputs below.
    dyn = torch.export.Dim.DYNAMIC
    with _without_exporter_noise():
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset,
                                    input_names=[INPUT], output_names=[OUTPUT],
                                    dynamic_shapes={"image": {0: dyn, 2: dyn, 3: dyn}},
                                    external_data=False, verbose=False)
    proto = program.model_proto
    _name_dims(proto)
    return proto


class _NoTorchvision(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "torchvision is not installed" not in record.getMessage()


@contextlib.contextmanager
def _without_exporter_noise() -> Iterator[None]:
    """NOTE: torch 2.13's exporter warned of torchvision's 4 missing operators (this model uses
    none of them) and of a FutureWarning of its own (``LeafSpec``) on every export: 6 lines of
    noise before the command's one. Other warnings pass."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    quiet = _NoTorchvision()
    registration.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        registration.removeFilter(quiet)


def _name_dims(proto: Any) -> None:
    """Call the input's and output's symbolic batch, height and width so.

    NOTE: the exporter names the output's height after the crop that gives it, "Max(0,
    Min(s73 + ((PythonMod(-s73, 16))//2), ..." (sympy does not see that it is s73): the
    network's output has the input's height and width, which the tests check on onnxruntime.
    """
    graph = proto.graph
    given = graph.input[0].type.tensor_type.shape.dim
    if any(not given[i].dim_param for i in (0, 2, 3)):
        raise ValueError(f"the exported graph's input is not dynamic in batch, height and width "
                         f"({[d.dim_param or d.dim_value for d in given]})")
    for value in (graph.input[0], graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        for i, name in ((0, "batch"), (2, "height"), (3, "width")):
            dims[i].dim_param = name  # (a oneof with dim_value: setting one clears the other)


def graph_opset(proto: Any) -> int:
    """The default (ai.onnx) domain's opset of ``proto``."""
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def metadata(cfg: Config, net: nn.Module, norm: tuple[list[float], list[float]],
             path: Path, state: dict[str, Any], ema: bool) -> dict[str, str]:
    """The file's metadata_props (``METADATA``); ``ema``: the weights are the checkpoint's
    weight EMA (``train.ema_decay``), as predict takes them."""
    m = size_multiple(net)
    p2, p98 = norm
    # (the imagery it was trained on, dataio.prepare --product; recorded since that option:
    # an older checkpoint's is RGB-PanSharpen's, the only one prepare read then)
    product = state.get("product") if isinstance(state.get("product"), str) else DEFAULT_PRODUCT
    bands = PRODUCTS.get(product, ())
    names = f": {', '.join(bands)}" if len(bands) == len(p2) else ""
    step = state.get("global_step")
    props = {
        "footprints.format": str(FORMAT),
        "classes": json.dumps(list(CLASS_NAMES)),
        "bands": str(len(p2)),
        "product": product,
        "band_order": "the GeoTIFF's bands in file order, band 1 first (as dataio.prepare reads "
                      f"them){names}",
        "input": f"{INPUT}: float32 NCHW, the raw band values (SpaceNet: 11-bit uint16) as "
                 "float32; normalised inside the graph",
        "output": f"{OUTPUT}: float32 NCHW softmax probabilities of the classes, the input's "
                  "height and width",
        "normalisation": json.dumps({"p2": p2, "p98": p98,
                                     "formula": "clip((x - p2) / (p98 - p2), 0, 1) per band"}),
        "model": cfg.model.name,
        "model_widths": json.dumps(list(getattr(net, "widths", ()))),
        "model_norm": cfg.model.norm,
        "model_pad_mode": cfg.model.pad_mode,
        "size_multiple": str(m),
        "min_size": str(m),
        "size_constraint": f"height and width >= {m}; the graph pads them to a multiple of {m} "
                           f"({cfg.model.pad_mode}, centred) and crops the output back",
        "checkpoint": str(path.resolve()),
        "checkpoint_step": json.dumps(step if isinstance(step, int) else None),
        "checkpoint_sha256": _file_sha256(path),
        "checkpoint_weights": "ema" if ema else "model",
    }
    assert tuple(props) == METADATA
    return props


def _file_sha256(path: Path) -> str:
    from trainer.predresume import file_sha256

    return file_sha256(path)


def _run_config(state: dict[str, Any], path: Path) -> Config:
    """The config the checkpoint records (the model settings its weights were trained with)."""
    from trainer.config import ConfigError, build_config

    try:
        raw = json.loads(state.get("config") or "")
    except (TypeError, json.JSONDecodeError):
        raw = None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: records no config of its run (not a checkpoint of this "
                          "trainer?)")
    return build_config(raw, f"{path} (its recorded config)")


def _manifest_percentiles(data: Path | None, path: Path, bands: int
                          ) -> tuple[list[float], list[float]]:
    """--data's percentiles, for a checkpoint that records none; ValueError without them."""
    if data is None:
        raise ValueError(f"{path}: records no training percentiles (a checkpoint from before "
                         "the trainer recorded them), which the graph's normalisation needs; "
                         "pass --data with the dataset it was trained on")
    from dataio.manifest import load_manifest

    manifest = load_manifest(data)
    if manifest.bands != bands:
        raise ValueError(f"--data {data}: {manifest.bands} bands, but {path}'s model takes "
                         f"{bands}")
    return manifest.percentiles()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="a checkpoint file, or a run directory (its best checkpoint)")
    p.add_argument("--out", type=Path, required=True, help="the ONNX file to write")
    p.add_argument("--opset", type=int, default=None,
                   help=f"ONNX opset of the graph, {MIN_OPSET} or newer (default: torch's "
                        "recommended one, 20 in torch 2.13)")
    p.add_argument("--data", type=Path, default=None,
                   help="only for a checkpoint from before the trainer recorded its training "
                        "percentiles: normalise with DATA/manifest.json's band_stats")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        # (a SIGTERM, Slurm's or a kill's, stops it as a Ctrl-C does: it vanished without a
        # word; the ONNX file is written whole or not at all, so --out is as it was)
        with stop_signals():
            return _export(args)
    except KeyboardInterrupt:
        ignore_further_sigint()  # (a further Ctrl-C in the interpreter's exit: a traceback)
        say(f"{PROG}: {stopped_by()}; {args.out} is left as it was")
        return stop_code()


def _onnx() -> Any:
    """The onnx package, or ImportError naming the extra to install."""
    try:
        import onnx
        import onnxscript  # noqa: F401 (what torch's exporter needs)
    except ImportError as e:
        raise ImportError(f"exporting needs the onnx and onnxscript packages ({e}): "
                          "pip install -e '.[export]'") from None
    return onnx


def _export(args: argparse.Namespace) -> int:
    from trainer.config import ConfigError
    from trainer.predict import load_net

    try:
        onnx = _onnx()
        newest = onnx.defs.onnx_opset_version()
        if args.opset is not None and not MIN_OPSET <= args.opset <= newest:
            raise ValueError(f"--opset {args.opset} is not one this export can give: "
                             f"{MIN_OPSET} (torch's exporter's lowest) to {newest} (onnx "
                             f"{onnx.__version__}'s newest)")
        path = ckpt.source_checkpoint(str(args.checkpoint), key="--checkpoint")
        check_writable(args.out, "--out", inputs=[("--checkpoint", path)])
        # (mapped: its optimizer state is never read; load_net maps it again)
        state = ckpt.load(path, mmap=True)
        cfg = _run_config(state, path)
        io = ckpt.io_channels(state["model"])
        if io is None:
            raise ValueError(f"{path}: its model has no convolution (not a checkpoint of this "
                             "trainer)")
        bands = io[0]
        net, norm, ema = load_net(path, cfg, bands, f"the model.* settings it records and "
                                  f"its own {bands} input bands")
        if norm is None:
            norm = _manifest_percentiles(args.data, path, bands)
        elif args.data is not None:  # (a user expecting DATA's statistics would get others)
            say(f"{PROG}: note: --data {args.data} is not read: {path} records the percentiles "
                "it trained with, and the graph normalises with those")
        model = Deployable(net.float().eval(), *norm).eval()
        with torch.no_grad():
            proto = to_onnx(model, bands, args.opset)
        if args.opset is not None and graph_opset(proto) != args.opset:
            raise ValueError(f"--opset {args.opset}: torch's exporter could not give this "
                             f"model in it (it gave {graph_opset(proto)}); use "
                             f"{graph_opset(proto)} or higher")
        for key, value in metadata(cfg, net, norm, path, state, ema).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(proto)
        atomic_write_bytes(args.out, proto.SerializeToString())
    except (ImportError, ConfigError, ValueError, OSError) as e:
        say(f"{PROG}: error: {e}")
        return 2
    step = state.get("global_step")
    print(f"wrote {args.out}: {cfg.model.name} ({bands} bands in, {len(CLASS_NAMES)} class "
          f"probabilities out, ONNX opset {graph_opset(proto)}) from {path}"
          + (f" (step {step})" if isinstance(step, int) else "")
          + (", its weight EMA (the weights its validation scored)" if ema else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
