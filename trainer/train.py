"""Train a footprint segmentation model, on one process or many under torchrun.

    torchrun --nproc_per_node=N -m trainer.train --config configs/NAME.toml --data DATA \
        --run-dir RUN [--set section.key=value ...]

Resumes from the newest complete checkpoint in RUN when there is one.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dataio.atomic import check_writable
from dataio.classes import NUM_CLASSES
from models import build_model_from_config
from postproc.pools import ignore_further_sigint, say
from trainer import checkpoint as ckpt
from trainer import dist, runlock
from trainer.config import (
    Config,
    ConfigError,
    build_config,
    check_device,
    read_config,
    unused_settings,
)

if TYPE_CHECKING:
    from dataio.manifest import Manifest
    from trainer.validate import ValTruth

log = logging.getLogger("footprints")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m trainer.train", description=__doc__.split("\n")[0],
        epilog=dist.exit_codes_help(
            "a config, --data or --run-dir refused, before training or once the ranks have "
            "started", "a non-finite loss, a full disk, a lost rank, a bug"))
    p.add_argument("--config", type=Path, required=True, help="TOML preset, e.g. configs/tiny.toml")
    p.add_argument("--data", type=Path, required=True, help="dataset made by dataio.prepare")
    p.add_argument("--run-dir", type=Path, required=True,
                   help="config.json, log.jsonl, checkpoints/ (resumed from when it holds any)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--check", action="store_true",
                   help="only check the config, --data, --run-dir (no other trainer in it, "
                        "and a run there can resume with these), --nproc and that metrics.port "
                        "is free here, then exit (0 fine, 2 not); the launch scripts run this "
                        "once before torchrun")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="with --check: the processes torchrun will start on this node (the "
                        "launch scripts' NPROC); more than its GPUs are refused under NCCL")
    p.add_argument("--elastic", action="store_true",
                   help="with --check: this node may join a group already training (torchrun "
                        "--nnodes MIN:MAX, multi_node.sh's NNODES=MIN:MAX), whose rank 0 holds "
                        "RUN's lock: that is not checked")
    p.add_argument("--multi-node", action="store_true",
                   help="with --check: torchrun starts the job on more than one node "
                        "(multi_node.sh's NNODES above 1, slurm.sbatch's nodes): a metrics.address "
                        "this node does not have is left to the node that has it")
    args = p.parse_args(argv)
    if args.nproc is not None and not args.check:
        p.error("--nproc goes with --check (a torchrun worker checks its LOCAL_WORLD_SIZE)")
    for flag in ("elastic", "multi_node"):
        if getattr(args, flag) and not args.check:
            p.error(f"--{flag.replace('_', '-')} goes with --check")
    return args


def _backend(cfg: Config) -> str | None:
    """The backend dist.init is given: None for its default (nccl with CUDA, gloo without)."""
    return None if cfg.dist.backend == "auto" else cfg.dist.backend


def check(args: argparse.Namespace) -> tuple[Config, dict[str, Any], ValTruth | None]:
    """The checks made before any process group: the config (with the device it needs), --nproc,
    --data and --run-dir. Returns the config, the keys given and the val truth's polygons per
    ImageId where validation scores F1 (read here to check it; the Trainer takes them rather
    than reading the file again), else None; raises ConfigError or ValueError."""
    given, where = read_config(args.config, args.overrides)
    cfg = build_config(given, where)
    check_device(cfg, torch.cuda.is_available())
    if args.nproc is not None and (_backend(cfg) or dist.default_backend()) == "nccl":
        # NOTE: the refusal every torchrun worker makes in dist.init, made once by the launch
        # scripts: from the workers, torchrun restarted the group MAX_RESTARTS times on it
        dist.check_one_gpu_each(args.nproc, "NPROC=")
    if not (args.data / "manifest.json").is_file():
        what = ("no manifest.json" if args.data.is_dir() else  # (a file: DATA/manifest.json)
                "not a directory" if args.data.exists() else "no such directory")
        raise ConfigError(f"--data {args.data}: {what} (run dataio.prepare first)")
    # NOTE: read, not only found: a damaged or foreign manifest passed, and every worker then
    # failed on it and torchrun restarted them MAX_RESTARTS times (the launch scripts' --check)
    from dataio.manifest import load_manifest

    try:
        manifest = load_manifest(args.data)
    except ValueError as e:
        raise ConfigError(f"--data {args.data}: {e}") from None
    # NOTE: a dataset prepared with --images-only has masks of "no label" only: every pixel is
    # ignored by the loss, so training would run its epochs and learn nothing
    if not manifest.labels:
        raise ConfigError(f"--data {args.data}: no labels (prepared with --images-only): "
                          "nothing to train on; train on a dataset prepared with its "
                          "geojson/buildings/, and predict on this one with trainer.predict")
    # NOTE: an empty val split is never validated (trainer.validate), as with val_every = 0,
    # which TrainConfig refuses with a patience: here the patience never counted, and the run
    # trained all its epochs without a word
    patience = cfg.train.early_stop_patience
    if patience > 0 and manifest.samples("val") == 0:
        raise ConfigError(f"--data {args.data}: its val split is empty, so nothing is "
                          f"validated, and train.early_stop_patience = {patience} counts "
                          "validations; set train.early_stop_patience = 0, or prepare the "
                          "dataset with a val split (dataio.prepare --split)")
    # NOTE: a split whose shards are all left out (truncated, missing) passed the launch
    # scripts' --check, and torchrun restarted the group MAX_RESTARTS times on it. Checked in
    # --check only (the launcher, once, before torchrun): in the workers a node's copy may lack
    # what another's has, and the Trainer's loaders say which rank could not open which split,
    # agreed across ranks (dist.agreed_loader), where a refusal here would stop one rank alone.
    validates = cfg.train.val_every > 0 and manifest.samples("val") > 0  # (as the Validator)
    if args.check:
        from dataio.sharding import DataError, check_usable

        for split in ("train", "val") if validates else ("train",):
            try:
                check_usable(manifest, split)
            except DataError as e:
                raise ConfigError(f"--data {args.data}: {e}") from None
    # NOTE: the val truth is read by the Validator in every worker, once training has started:
    # a corrupt one failed there and torchrun restarted the group on it
    truth = None
    if validates and cfg.train.val_f1:
        from postproc.csvio import read_truth_csv

        try:
            truth = read_truth_csv(args.data / "val" / "truth.csv").polygons
        except (ValueError, OSError) as e:  # CsvError names the file and the line
            raise ConfigError(f"--data {args.data}: {e} (or set train.val_f1=false)") from None
    check_writable(args.run_dir / "config.json", "--run-dir", given=args.run_dir)
    _check_init_from(cfg, manifest, args)
    if args.check:
        # (the refusals rank 0 makes once the group is up: every rank then exited 2 and
        # torchrun restarted the group on them MAX_RESTARTS times)
        if not args.elastic:  # (a late node of an elastic job finds its own rank 0 there)
            runlock.check_free(args.run_dir)
        _check_resume(cfg, manifest, args)
        _check_metrics_port(cfg, args.multi_node)
    return cfg, given, truth


def _check_metrics_port(cfg: Config, multi_node: bool = False) -> None:
    """``metrics.port`` can be served on ``metrics.address`` here: bound and let go, as rank 0's
    endpoint binds it. NOTE: in --check only (the launch scripts, once per node, before
    torchrun): from rank 0 every rank exits 2 and torchrun restarted the group on it
    MAX_RESTARTS times (35 s and exit 1 on a tiny run). On several nodes (``multi_node``)
    each checks its own port, since rank 0 may start on any of them, but not an address it
    lacks: that one is another node's, where rank 0 serves it."""
    if cfg.metrics.port == 0:
        return
    from trainer.metrics import MetricsError, TrainMetrics

    endpoint = TrainMetrics(dist.DistEnv(), cfg.metrics.port, cfg.metrics.address)
    try:
        endpoint.start()
    except MetricsError as e:
        # NOTE: metrics.address set to one node's cluster address (MetricsConfig's advice for a
        # scrape from elsewhere) reaches every node of multi_node.sh: each other node refused
        # it here ("Cannot assign requested address") and the job never started
        if multi_node and e.errno == errno.EADDRNOTAVAIL:
            return
        raise ConfigError(str(e)) from None
    endpoint.stop()


def _meta_model(cfg: Config, manifest: Manifest) -> torch.nn.Module:
    """This config's network for --data's bands on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        return build_model_from_config(dataclasses.replace(cfg.model, compile=False),
                                       manifest.bands, NUM_CLASSES)


def _check_resume(cfg: Config, manifest: Manifest, args: argparse.Namespace) -> None:
    """A run that would resume from RUN's newest checkpoint can (``ckpt.check_resume``: the same
    model, optimizer, imagery product and dataset). NOTE: in --check only (the launch scripts,
    once, before torchrun): the Trainer refuses the same in every worker, but there every rank
    exits 2 and torchrun restarted the group MAX_RESTARTS times on it, ending in exit 1."""
    found = ckpt.load_latest(args.run_dir, mmap=True)  # (the one the Trainer would resume from)
    if found is None:
        return
    state, path = found
    ckpt.check_resume(state, path, manifest, _meta_model(cfg, manifest).state_dict(),
                      dataclasses.asdict(cfg.model), cfg.optim.name)


def _check_init_from(cfg: Config, manifest: Manifest, args: argparse.Namespace) -> None:
    """``train.init_from`` names a checkpoint that loads into this config's model for --data's
    bands (ValueError naming the file and what differs). Every rank makes the check on the same
    file, so all agree; the Trainer loads the weights on rank 0 only and sends them to the rest.

    NOTE: skipped for a run that has a checkpoint: it resumes and ignores init_from, and a
    restarted worker (torchrun --max-restarts) must not be stopped by a source moved since.
    """
    if not cfg.train.init_from or ckpt.list_checkpoints(args.run_dir):
        return
    path = ckpt.source_checkpoint(cfg.train.init_from)
    net = _meta_model(cfg, manifest)  # (the dtype is checked when it loads)
    try:
        # NOTE: mapped, not read: the check needs the weights' names and shapes alone, and
        # every worker of a node makes it at once (the source's optimizer state is twice the
        # model's size with Adam)
        state = ckpt.load(path, mmap=True)
        ckpt.check_init_from_product(state, path, manifest)
        ckpt.check_model(net.state_dict(), ckpt.scored(state), path,
                         ckpt.init_from_hint(manifest), dataclasses.asdict(cfg.model))
    except ValueError as e:  # (each names the file)
        raise ValueError(f"train.init_from: {e}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # NOTE: the first Ctrl-C raises KeyboardInterrupt and sets Ctrl-C aside in the same step. A
    # second one while the first unwound cut its clean-up short (the loader's read-ahead thread
    # and DALI pipeline, the metrics server, the process group): an 'Exception ignored in
    # Pipeline.__del__' traceback, a KeyboardInterrupt traceback and exit -2, or, in a checkpoint
    # write, torch's zip writer left unfinished, which aborted the process at exit ('terminate
    # called ... write to closed file', exit -6).
    # (caught outside: dist.stop_signals also turns a press that numba reported as a SystemError
    # into the KeyboardInterrupt it was, on its way out; after a press Ctrl-C stays set aside)
    # A SIGTERM (torchrun's to the survivors of a failed worker, Slurm's at the job's end) stops
    # it the same way, with its own line and exit code 143 (dist.stop_signals).
    try:
        with dist.stop_signals():
            return _train(args)
    except KeyboardInterrupt:  # checkpoints are written whole or not at all: nothing is lost
        say(f"trainer.train: {dist.stopped_by()}; rerun the same command to resume from the "
            f"newest complete checkpoint in {args.run_dir / 'checkpoints'}")
        # (set aside already after a press; a further Ctrl-C in the interpreter's exit
        # would add a traceback or end the process by SIGINT)
        ignore_further_sigint()
        return dist.stop_code()


def _train(args: argparse.Namespace) -> int:
    try:
        # (--check runs in the launcher, outside torchrun: its variables are not set yet)
        env = dist.DistEnv() if args.check else dist.DistEnv.from_env()
        # NOTE: every rank parses and validates the config before any process group exists, so
        # a bad key fails fast everywhere instead of hanging the others at the first collective.
        # The launch scripts make the same checks once with --check before torchrun, which
        # would otherwise restart the group on an error that no restart can mend.
        cfg, given, val_truth = check(args)
    except (ConfigError, ValueError) as e:
        say(f"trainer.train: error: {e}")
        return 2
    if args.check:
        return 0
    from trainer.trainer import NonFiniteError, Trainer  # heavy imports after the checks

    dist.setup_logging(env)
    if env.is_main:  # every rank read the same config: one line each, not one per rank
        for line in unused_settings(cfg, given):
            log.warning("%s", line)
    try:
        dist.init(env, _backend(cfg), cfg.dist.timeout_s)
        dist.seed_everything(cfg.train.seed, env.rank)
        Trainer(cfg, env, args.data, args.run_dir, val_truth=val_truth).train()
    except (NonFiniteError, ValueError, RuntimeError, OSError) as e:
        # NOTE: a peer killed (OOM, a lost node) gave gloo's or NCCL's raw text here, twice,
        # naming neither the cause nor the way on (on one node torchrun's SIGTERM mostly comes
        # first; across nodes it does not). Now one line; exit code 1 (dist.PEER_LOST_EXIT: a
        # failure in the run, which a rerun resumes).
        lost = dist.describe_failure(e, env.rank, "rerun the same command to resume from the "
                                     f"newest complete checkpoint in {args.run_dir}/checkpoints")
        # NOTE: said once, as every command's last line (a timestamped "[rank N] ERROR" log
        # line of the same text came before it), and with several ranks naming this one, as
        # that log line did: an error no collective agreed on (an out-of-memory error in its
        # step) left the survivors saying "a peer rank left ... (the peer's own log says why
        # it stopped)" and, after a restart that mended it, no torchrun summary naming the rank
        own = (f"rank {env.rank}: {e}" if env.world_size > 1
               and not isinstance(e, dist.RankError) else str(e))
        say(f"trainer.train: error: {lost or own}")
        # NOTE: a refusal found once the group is up (the loaders' agreed refusal of a split,
        # a checkpoint of another model or dataset, the metrics port taken) is bad input as
        # the checks before it are: exit 2 on every rank (RankError carries it), where it was 1
        # like a failure of the run (a non-finite loss, a lost peer; an OSError here is the
        # disk's: the paths were checked before the group)
        return dist.exit_code_for(e, oserror_refuses=False)
    finally:
        # NOTE: after a Ctrl-C this runs with Ctrl-C set aside (main): a teardown that hangs is
        # ended by the launcher (torchrun sends SIGTERM on a second Ctrl-C, SIGKILL after 30 s);
        # without torchrun there is no process group.
        dist.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
