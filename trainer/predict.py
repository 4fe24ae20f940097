"""Write prediction shards for a split with a trained run's checkpoint.

    python -m trainer.predict --run-dir RUN --data DATA --split test --out PRED [--tta]
    torchrun --nproc_per_node=N -m trainer.predict ...   (ranks split the samples)

Output: ``PRED/pred-NNNNNN.tar``, one sample per tile: ``prob.png`` (8-bit RGB of round(255*p)
for background, building, boundary) and the tile's ``meta.json``. Whole tiles of any size. A
chip's sample with a margin of context (``dataio.prepare --chip-margin``; its meta.json has a
``core``) is predicted whole and written cut to its core, with the core's meta.json (transform,
height, width; no ``core``): chips of a scene meet edge to edge, as ``postproc.merge`` needs.
Rank r writes shards ``r, r+W, r+2W, ...`` so ranks never collide. ``PRED/provenance.json`` names
the run directory, checkpoint, dataset and split the predictions came from. The shards are
written to ``PRED/.partial`` and moved up when all ranks are done; shards of an earlier
prediction in PRED that were not replaced are removed. ``PRED/.publishing`` exists while they
move (``postproc.predio.publish_dir``): readers refuse a PRED that a kill left with it, and a
rerun of this command replaces that PRED's shards and removes the marker.

A stopped run resumes: an error, Ctrl-C or a kill leaves PRED as it was and keeps the stage with the
shards written so far, and a rerun of the same command keeps each rank's complete shards and
predicts only the tiles after them; the output is an uninterrupted run's, byte for byte. A stage
made by another prediction (the weights loaded, the data, ``--split``, ``--tta``, ``--shard-size``,
``--batch-size``, the number of ranks, the code, ...) is discarded with one line saying why;
``--fresh`` discards it regardless (``trainer.predresume``). A stage that holds no shard is removed,
and a successful run leaves none. Ctrl-C is one line and exit code 130 on each rank, and leaves PRED
as it was (the line says whether the stage is kept for a rerun), or, pressed during the moves,
marked so. A SIGTERM (torchrun's, Slurm's) does the same, 'terminated (SIGTERM)', exit code 143.
An error is one line and exit code 2 for bad input or settings, 1 for a failure of the run (a
full disk while writing the stage or PRED, a lost rank, a bug), on every rank the failing one's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from affine import Affine
from torch import nn
from tqdm import tqdm

from dataio.atomic import (
    atomic_write_text,
    check_not_a_directory,
    check_writable,
    discard_staging_dir,
    missing_dirs,
    remove_made_dirs,
    staging_dir,
)
from postproc.pools import ignore_further_sigint, say
from trainer import dist, predresume

if TYPE_CHECKING:
    from dataio.loader import Batch, Loader, LoaderConfig
    from dataio.manifest import Manifest
    from trainer.amp import Precision
    from trainer.config import Config

log = logging.getLogger("footprints")
PROVENANCE = "provenance.json"  # PRED/provenance.json: which run, checkpoint and split
SKIPPED_BEFORE = "skipped by the stopped run"  # (a resumed run's: its reasons were said then)


def predict_probs(net: nn.Module, image: torch.Tensor, tta: bool) -> torch.Tensor:
    """Softmax probabilities NCHW; with ``tta`` averaged over horizontal and vertical flips."""
    probs = torch.softmax(net(image).float(), dim=1)
    if tta:
        for dims in ((3,), (2,), (2, 3)):
            flipped = net(torch.flip(image, dims)).float()
            probs += torch.flip(torch.softmax(flipped, dim=1), dims)
        probs /= 4
    return probs


def per_tile(fn: Callable[[torch.Tensor], torch.Tensor], batch: Batch,
             skip_padding: bool = False) -> torch.Tensor:
    """``fn`` (a network: NCHW in, NCHW of the same height and width out) run on each valid tile
    of ``batch`` at the tile's own size, the tiles of one size together; the outputs in one
    tensor of the batch's shape. Beyond a tile's edge, and in a slot without a tile, the output
    is no prediction: count only the valid pixels of valid samples. A batch of tiles of its own
    size is one call on the whole batch, its padding slots (zero images) with it, unless
    ``skip_padding``.

    NOTE: the loader pads a batch of mixed tile sizes to its largest tile. Run on the padded
    batch, a smaller tile was predicted from the zeros beyond its edge (and, with TTA, from a
    flip that moved them to the other side): its prediction, and so the validation IoU and F1,
    changed with the tiles that shared its batch, with the batch size and the number of ranks.
    The model pads a tile to its multiple itself, as for a tile alone.
    NOTE: ``skip_padding`` is trainer.predict's: the loader fills a rank's last batch up to the
    batch size with zero images, and a split of one large scene (benchmarks.chips: one 1280 px
    sample, batch size 8) was predicted 8 times over, 4.97 s against 0.73 s for its 25 chips.
    Validation keeps the batch's shape: a compiled model (train-time ``model.compile``) would
    compile again for a batch of another size.
    """
    n, _, height, width = batch.image.shape
    sizes: dict[tuple[int, int], list[int]] = {}
    for i, valid in enumerate(batch.valid.tolist()):
        if valid:
            sizes.setdefault((batch.meta[i]["height"], batch.meta[i]["width"]), []).append(i)
    if list(sizes) == [(height, width)] and (not skip_padding or len(sizes[height, width]) == n):
        # one tile size, the batch's (SpaceNet's 650x650): one call on the whole batch
        return fn(batch.image)
    if not sizes and not skip_padding:
        return fn(batch.image)
    if not sizes:  # (all padding: one slot run, for the output's classes and dtype)
        part = fn(batch.image[:1])
        return part.new_zeros((n, part.shape[1], height, width))
    out: torch.Tensor | None = None
    for (h, w), idx in sizes.items():
        part = fn(batch.image[idx, :, :h, :w])
        if out is None:
            out = part.new_zeros((n, part.shape[1], height, width))
        out[idx, :, :h, :w] = part
    assert out is not None
    return out


def to_core(prob: np.ndarray, meta: dict) -> tuple[np.ndarray, dict]:
    """A sample's prediction (HxWxC) and meta.json as written: cut to its ``core`` (a chip with a
    margin of context, ``dataio.prepare --chip-margin``) with the core's transform, height and
    width and no ``core`` key; any other sample as it is."""
    core = meta.get("core")
    if core is None:
        return prob, meta
    height, width = prob.shape[:2]
    ok = (isinstance(core, list) and len(core) == 4
          and all(isinstance(v, int) and not isinstance(v, bool) for v in core))
    r, c, h, w = core if ok else (-1, -1, 0, 0)
    if min(r, c) < 0 or min(h, w) < 1 or r + h > height or c + w > width:
        raise ValueError(f"{meta.get('image_id')}: meta.json core {core!r} is not [row, col, "
                         f"height, width] inside its {height} x {width} px sample; rerun "
                         "dataio.prepare")
    out = {k: v for k, v in meta.items() if k != "core"}
    # (rasterio's window transform: the sample's, moved by the core's offset)
    out.update(transform=list(Affine(*meta["transform"][:6]) @ Affine.translation(c, r))[:6],
               height=h, width=w)
    return prob[r:r + h, c:c + w], out


def _samples(loader: object, net: nn.Module, precision: object, tta: bool,
             progress: bool, done: int = 0) -> Iterator[tuple[str, np.ndarray, dict]]:
    # NOTE: closed however the loop ends (here, or the consumer's close of this generator): an
    # interrupted bar stayed open on the terminal's line, and the 'interrupted' line was glued on.
    # (``done``: the batches a resumed run starts after)
    with tqdm(total=len(loader), initial=done, desc="predict", unit="batch",
              disable=not progress) as bar:
        yield from _batches(loader, net, precision, tta, bar)


def _batches(loader: object, net: nn.Module, precision: object, tta: bool,
             bar: tqdm) -> Iterator[tuple[str, np.ndarray, dict]]:
    for batch in loader:
        with torch.no_grad(), precision.autocast():
            probs = per_tile(lambda x: predict_probs(net, x, tta), batch, skip_padding=True)
        probs = probs.permute(0, 2, 3, 1).cpu().numpy()
        for i, key in enumerate(batch.keys):
            if bool(batch.valid[i]):
                h, w = batch.meta[i]["height"], batch.meta[i]["width"]
                # NOTE: cut after the whole sample (its margin, TTA's flips) is predicted
                yield key, *to_core(probs[i, :h, :w], batch.meta[i])
        bar.update()


def _unread(shares: list[tuple[int, dict[str, int]]], shards_skipped: Counter[str],
            listed: int) -> str:
    """Why tiles of the split got no prediction: the loader's skipped samples by reason (summed
    over ranks) and the tiles of shards it left out (the same on every rank)."""
    skipped: Counter[str] = Counter()
    for _, reasons in shares:
        skipped.update(reasons)
    in_shards = listed - sum(n for n, _ in shares) - sum(skipped.values())
    parts = [f"{reason}: {n}" for reason, n in sorted(skipped.items())]
    if in_shards > 0:
        parts.append(f"in shards left out: {in_shards} ("
                     f"{', '.join(f'{r}: {n}' for r, n in sorted(shards_skipped.items()))})")
    return ", ".join(parts) or "none"


Percentiles = tuple[list[float], list[float]]


def load_net(ckpt_path: Path, cfg: Config, bands: int, hint: str,
             manifest: Manifest | None = None) -> tuple[nn.Module, Percentiles | None, bool]:
    """The run's network with the checkpoint's weights, on the CPU, the per-band p2/p98 it
    was trained with (None: a checkpoint from before the trainer recorded them), and whether
    the weights are its weight EMA (``train.ema_decay``: what its validation scored); ``hint``:
    what the checkpoint must match, for the message when it does not
    (``checkpoint.load_model``). The weights a prediction uses: ``trainer.export`` loads them
    here too.

    With ``manifest`` (--data's), a checkpoint trained on another imagery product than it holds
    (``prepare --product``) is refused naming both, before its weights are matched."""
    from models import build_model_from_config
    from trainer.checkpoint import check_product, has_ema, load, load_model, scored

    # NOTE: mapped, not read: every rank loads the checkpoint, whose optimizer state (twice the
    # model's size with Adam) prediction never uses; only the model's tensors are read
    state = load(ckpt_path, map_location="cpu", mmap=True)
    if manifest is not None:
        check_product(state, ckpt_path, manifest, "predict a dataset prepared with "
                      f"dataio.prepare --product {state.get('product')}, or with a run trained "
                      f"on {manifest.product}")
    # The trainer's own builder, so every model option (norm, pad mode, ...) matches the
    # checkpoint; no compile, since prediction sees tiles of every size once.
    net = build_model_from_config(dataclasses.replace(cfg.model, compile=False), bands, 3)
    load_model(net, scored(state), ckpt_path, hint, dataclasses.asdict(cfg.model))
    ema = has_ema(state)
    saved = state.get("percentiles")
    if saved is None:
        return net, None, ema
    try:
        p2, p98 = [float(v) for v in saved["p2"]], [float(v) for v in saved["p98"]]
    except (TypeError, KeyError, ValueError):
        raise ValueError(f"{ckpt_path}: its 'percentiles' are not p2/p98 lists") from None
    # (their band count is the model's, which load_model has just matched to --data's)
    return net, (p2, p98), ema


def _weights_sha256(net: nn.Module) -> str:
    """A digest of the weights ``net`` holds: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name, t in net.state_dict().items():
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_same_weights(digest: str, ckpt_path: Path) -> None:
    """Raise on every rank unless all ranks loaded the same weights (``digest``: this rank's).

    NOTE: each rank reads the file itself; a best.pt that a run still training re-marks in
    between gave a prediction from two checkpoints, without a word.
    """
    digests = dist.gather_objects(digest)
    other = next((r for r, d in enumerate(digests) if d != digests[0]), None)
    if other is not None:
        raise ValueError(f"rank {other} loaded other weights from {ckpt_path} than rank 0 (the "
                         "file changed while the ranks read it: is the run still training?); "
                         "predict again, or pass --checkpoint step-*.pt")


def _default_checkpoint(run_dir: Path) -> Path:
    """RUN's best checkpoint: ``checkpoints/best.pt``, or the one the run's newest checkpoint
    names as its best (``best_step``) where best.pt was not re-pointed at it yet
    (``checkpoint.source_checkpoint``, as ``train.init_from`` and ``trainer.export`` take it).

    NOTE: a run killed between committing a new best and re-pointing best.pt (a hard link, or a
    whole copy where links fail) repairs best.pt only when it resumes; predict took the older
    best.pt, other weights than the run's best, which its own log and export named."""
    from trainer.checkpoint import BEST, checkpoint_dir, source_checkpoint

    best = checkpoint_dir(run_dir) / BEST
    # (a directory without best.pt: the caller says why, with _no_best_hint)
    return source_checkpoint(str(run_dir), "--run-dir") if best.is_file() else best


def _no_best_hint(run_dir: Path) -> str:
    """What to do about a run directory without best.pt: train, or name a step checkpoint."""
    from trainer.checkpoint import list_checkpoints

    steps = list_checkpoints(run_dir)
    if not steps:
        return " (train first, or pass --checkpoint)"
    # NOTE: best.pt comes with the first validation: a run with train.val_every > 1 (or mid-epoch
    # checkpoints) stopped before it has step checkpoints only, and "train first" misled.
    return (f" (no checkpoint of the run is marked best yet: it has not validated; pass "
            f"--checkpoint {steps[-1]}, its newest, to predict with that one)")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # NOTE: the first Ctrl-C raises KeyboardInterrupt and sets Ctrl-C aside in the same step
    # (as trainer.train does): a second one cannot cut the clean-up below short.
    # (caught outside, as trainer.train does: dist.stop_signals also turns a press that numba
    # reported as a SystemError into the KeyboardInterrupt it was, on its way out; after a press
    # Ctrl-C stays set aside)
    # A SIGTERM (torchrun's, Slurm's) stops it the same way: its own line, exit code 143.
    try:
        with dist.stop_signals():
            return _predict(args)
    except KeyboardInterrupt:
        from postproc.predio import PUBLISHING

        # (under torchrun each rank says it: the terminal and torchrun signal every one)
        how = f"trainer.predict: {dist.stopped_by()};"
        if (args.out / PUBLISHING).exists():
            say(f"{how} {args.out} is marked as being replaced ({PUBLISHING}): rerun the same "
                "command")
        else:
            say(f"{how} {args.out} is left as it was{_kept(args.out)}")
        ignore_further_sigint()  # (a further Ctrl-C in the interpreter's exit: a traceback)
        return dist.stop_code()


def _kept(out: Path) -> str:
    """What a failed or interrupted run's line adds when its stage is kept for a rerun."""
    if not predresume.resumable(out):
        return ""
    return (f"; the shards written so far are kept in {staging_dir(out)}: rerun the same "
            "command to resume (--fresh to start over)")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m trainer.predict", description=__doc__.split("\n")[0],
        epilog=dist.exit_codes_help(
            "--run-dir, --data, the checkpoint or a flag refused, a directory in --out where "
            "a shard or the publish's mark goes",
            "a full disk while writing the stage or --out, a lost rank, a bug"))
    p.add_argument("--run-dir", type=Path, required=True, help="the training run directory")
    p.add_argument("--data", type=Path, required=True, help="dataset made by dataio.prepare")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="split of --data to predict (default %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="directory for pred-NNNNNN.tar")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint file (default: the run's best, RUN/checkpoints/best.pt)")
    p.add_argument("--tta", action="store_true", help="average over flips (4x the compute)")
    p.add_argument("--shard-size", type=int, default=100,
                   help="tiles per prediction shard (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=0, help="default: the run's data.batch_size")
    p.add_argument("--fresh", action="store_true",
                   help="discard a stopped run's shards in OUT/.partial instead of resuming")
    args = p.parse_args(argv)
    if args.shard_size < 1:
        p.error(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.batch_size < 0:
        p.error(f"--batch-size must be >= 1 (or 0: the run's), got {args.batch_size}")
    return args


def _check_shard_names(args: argparse.Namespace, samples: int, env: dist.DistEnv) -> None:
    """Refuse (ValueError: exit 2) a directory in ``--out`` under a name that this rank's
    shards will take when published, or, on rank 0 (which publishes), at the publish's mark
    (``dataio.atomic.check_not_a_directory``)."""
    from postproc.predio import PUBLISHING

    flag = f"--out {args.out}"
    if env.is_main:  # (its rename failed at the publish, after the prediction, exit 1)
        check_not_a_directory(args.out / PUBLISHING, flag, "the publish's mark")
    for name in predresume.share_shard_names(samples, env.rank, env.world_size,
                                             args.shard_size):
        check_not_a_directory(args.out / name, flag, "a prediction shard")


def _settle_stage(out: Path, made: list[Path], staged: bool) -> None:
    """Rank 0, after a failure or a Ctrl-C: keep this prediction's stage if it holds shards (a
    rerun resumes it), else remove it and the directories made for it. Before the stage was
    this run's, one there is left for a rerun to judge (it may be resumable)."""
    if not staged:
        remove_made_dirs(made)
    elif not predresume.resumable(out):
        discard_staging_dir(out, made)


def _resume_key(args: argparse.Namespace, weights: str, norm: Percentiles | None, cfg: Config,
                data_cfg: LoaderConfig, loader: Loader, device: torch.device,
                precision: Precision, world_size: int) -> dict[str, object]:
    """What decides which tiles land in which shard, and their values (the code that computes
    them too): a stage made with anything else is not resumed (``trainer.predresume``)."""
    return {"format": predresume.KEY_FORMAT, "weights_sha256": weights, "percentiles": norm,
            "model": dataclasses.asdict(dataclasses.replace(cfg.model, compile=False)),
            "manifest_sha256": predresume.file_sha256(args.data / "manifest.json"),
            "samples": loader.fingerprint, "split": args.split, "tta": args.tta,
            "shard_size": args.shard_size, "batch_size": data_cfg.batch_size,
            "world_size": world_size, "backend": data_cfg.backend, "device": device.type,
            "precision": precision.name, "code": predresume.code_sha256()}


def _predict(args: argparse.Namespace) -> int:
    out_made = missing_dirs(args.out)
    staged = False
    try:
        env = dist.DistEnv.from_env()
    except ValueError as e:
        say(f"trainer.predict: error: {e}")
        return 2
    ckpt_path = args.checkpoint or _default_checkpoint(args.run_dir)
    # (a checkpoint file given as --run-dir, or a directory as --checkpoint, was 'not found')
    if args.run_dir.is_file():
        say(f"trainer.predict: error: --run-dir {args.run_dir} is a file; give the run "
            "directory (and a checkpoint of it with --checkpoint)")
        return 2
    if args.checkpoint is not None and args.checkpoint.is_dir():
        say(f"trainer.predict: error: --checkpoint {ckpt_path} is a directory; give a "
            f"checkpoint file, e.g. {ckpt_path / 'best.pt'}")
        return 2
    if not ckpt_path.is_file():
        hint = "" if args.checkpoint else _no_best_hint(args.run_dir)
        say(f"trainer.predict: error: {ckpt_path} not found{hint}")
        return 2
    try:  # (an --out that is a file, or under one, was "[Errno 20] Not a directory: '...'")
        check_writable(args.out / PROVENANCE, "--out", given=args.out)
    except ValueError as e:
        say(f"trainer.predict: error: {e}")
        return 2
    from dataio.loader import build_loader
    from dataio.manifest import load_manifest
    from postproc.predio import publish_pred_dir, write_pred_shard
    from trainer.amp import resolve
    from trainer.config import ConfigError, load_run_config

    try:
        cfg = load_run_config(args.run_dir)
        manifest = load_manifest(args.data)
        dist.init(env)
        device = dist.device_for(env)

        # agreed: a rank that cannot load it stops every rank with its reason
        hint = (f"{args.run_dir / 'config.json'} (model.*) and the {manifest.bands} bands "
                f"({manifest.product}) of {args.data / 'manifest.json'}")
        net, norm, ema = dist.on_every(f"loading {ckpt_path}",
                                       lambda: load_net(ckpt_path, cfg, manifest.bands, hint,
                                                        manifest))
        if ema and env.is_main:
            say(f"trainer.predict: predicting with the weight EMA of {ckpt_path} (its run's "
                "train.ema_decay), the weights its validation scored")
        # NOTE: the run's training percentiles, not --data's (another AOI's differ, and the
        # model would see its inputs scaled otherwise); silent when they differ, since that is
        # the normal case for a dataset prepared on its own.
        if norm is None and env.is_main:
            say(f"trainer.predict: {ckpt_path} does not record its training percentiles (an "
                f"older checkpoint); normalising with {args.data / 'manifest.json'}'s band_stats")
        # NOTE: the weights loaded, not the file's bytes or its path and mtime: a best.pt
        # re-marked by a run still training after this run read it is other weights, at the same
        # path. Hashed once a run (~1 s for 400 MB): the resume key's, and compared across ranks.
        weights = _weights_sha256(net)
        if env.world_size > 1:
            _check_same_weights(weights, ckpt_path)
        net.to(device).eval()
        data_cfg = dataclasses.replace(cfg.data, batch_size=args.batch_size or cfg.data.batch_size)
        # agreed: else tiles are silently dropped or repeated
        loader = dist.agreed_loader(args.split, args.data, lambda: build_loader(
            args.data, args.split, data_cfg, env.rank, env.world_size, train=False,
            device=device, percentiles=norm))
        # A GPU run's precision (fp16 is CUDA only; bf16 on a CPU without native bf16 ran 5-6.5x
        # slower than fp32, trainer.amp) is not the CPU's: a CPU predicts in its best, "auto".
        amp = ("auto" if cfg.train.amp in ("fp16", "bf16") and device.type != "cuda"
               else cfg.train.amp)
        precision = resolve(amp, device)
        # NOTE: each rank its own shards' names, agreed, before any prediction: a directory
        # under one failed only at the publish, after the whole prediction ("Is a directory"),
        # exit 1 as for a full disk, with --out left marked as being replaced (.publishing)
        dist.on_every(f"checking --out {args.out}",
                      lambda: _check_shard_names(args, len(loader.index.samples), env))
        # Shards go to a staging directory and into --out only once every rank is done.
        staging = staging_dir(args.out)

        def stage() -> bool:
            key = _resume_key(args, weights, norm, cfg, data_cfg, loader, device, precision,
                              env.world_size)
            resuming = predresume.prepare_stage(args.out, key, args.fresh)
            # provenance: lets postproc.polygonize find the run's tuned settings by default
            atomic_write_text(staging / PROVENANCE, json.dumps({
                "run_dir": str(args.run_dir.resolve()), "checkpoint": str(ckpt_path.resolve()),
                "data": str(args.data.resolve()), "split": args.split, "tta": args.tta}) + "\n")
            return resuming

        # rank 0 prepares it (a stopped run's kept, or a fresh one), and every rank waits for
        # that (or stops with its error) and learns which
        staged = True  # (this prediction's stage from here on: a failure may keep it)
        resuming = dist.broadcast_object(dist.on_main(env, f"preparing {staging}", stage))

        def write_share() -> tuple[int, dict[str, int], int]:
            at = predresume.Resume()
            if resuming:
                at = predresume.scan_share(staging, [r.key for r in loader.index.samples],
                                           env.rank, env.world_size, data_cfg.batch_size,
                                           args.shard_size)
                loader.load_state_dict(predresume.loader_state(loader, at.step))
            predresume.clear_share(staging, env.rank, env.world_size, at.shards)
            written, k = at.tiles, at.shards
            # NOTE: closed (the progress bar, the loader's read-ahead thread and pipeline) however
            # the share ends: a Ctrl-C while a shard was written left them to garbage collection
            with loader, contextlib.closing(_samples(loader, net, precision, args.tta,
                                                     env.is_main, at.step)) as samples:
                # (the first batch's tiles already in a kept shard: predicted with their batch)
                stream = (s for s in samples if s[0] not in at.drop)
                while True:
                    chunk = [s for _, s in zip(range(args.shard_size), stream, strict=False)]
                    if not chunk:
                        break
                    # NOTE: no directory made: the stage exists (rank 0 made it before any rank
                    # got here) unless a stopped run's rank 0 has removed it, without waiting for
                    # the others (a collective after a Ctrl-C could hang), while this rank was
                    # not stopped yet (its Ctrl-C later, or none: another node's terminal). That
                    # write made PRED/.partial (and a PRED the run had made) again, left behind
                    # with the shard. Now it fails, and this rank stops with the others.
                    written += write_pred_shard(
                        staging / predresume.shard_name(k, env.rank, env.world_size), chunk,
                        make_dirs=False)
                    k += 1
            skipped = dict(loader.stats.samples_skipped)
            if at.skipped:
                skipped[SKIPPED_BEFORE] = at.skipped
            return written, skipped, at.tiles

        # agreed: one rank's failure (a full disk) stops every rank with its reason
        shares = dist.gather_objects(dist.on_every("writing predictions", write_share))
        total = sum(n for n, _, _ in shares)
        unread = _unread([(n, why) for n, why, _ in shares], loader.index.shards_skipped,
                         manifest.samples(args.split))
        if total == 0:
            # NOTE: publishing would replace an earlier prediction in --out with nothing
            raise ValueError(f"no tile of split {args.split!r} of {args.data} could be read "
                             f"({unread}; see the warnings above); {args.out} is left as it was")
        def publish() -> None:
            # (a stage without its key is never resumed: one whose publish was cut short)
            (staging / predresume.RESUME_KEY).unlink()
            publish_pred_dir(staging, args.out)

        # agreed: rank 0's failure here (a full disk, EIO) stops every rank with its code, where
        # the others had exited 0
        dist.on_main(env, f"publishing into {args.out}", publish)
        if env.is_main:
            listed, kept = manifest.samples(args.split), sum(n for _, _, n in shares)
            print(f"wrote predictions for {total} tiles of {args.split} to {args.out}" + (
                f" ({kept} of them in the stopped run's shards, kept)" if kept else "") + (
                f"; {listed - total} of its {listed} tiles were left out ({unread}; see the "
                "warnings above)" if total < listed else ""))
    except (ConfigError, ValueError, OSError, RuntimeError) as e:
        # (every rank stops here: the errors are agreed; rank 0 keeps or removes the stage)
        if env.is_main:
            _settle_stage(args.out, out_made, staged)
        # NOTE: a peer killed (OOM, a lost node) gave gloo's or NCCL's raw text (see
        # dist.describe_failure): one line instead, exit code 1 (a failure to rerun, not bad input)
        lost = dist.describe_failure(e, env.rank)
        say(f"trainer.predict: error: {lost or e}{_kept(args.out) if staged else ''}")
        # NOTE: exit 2 for bad input or settings, 1 for a failure of the run, on every rank as
        # on the failing one (a RankError carries its kinds); all were 2 but a lost peer. An
        # OSError before the stage is reading --run-dir, --data or the checkpoint (bad input);
        # from the stage on it is writing the stage or --out (a full disk, EIO: rerun to resume).
        return dist.exit_code_for(e, oserror_refuses=not staged)
    except KeyboardInterrupt:
        # NOTE: the other ranks were interrupted too (the terminal's group, torchrun's forward);
        # rank 0 keeps a stage of shards for the rerun, and removes one without (as
        # dataio.prepare does): until a rerun it sat hidden in --out, in a directory that this
        # run may have created for nothing.
        if env.is_main:
            _settle_stage(args.out, out_made, staged)
        raise
    finally:
        dist.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
