"""The Trainer: DDP model, AMP, the loop, validation, checkpoints, metrics.

Reads top to bottom: ``train()`` runs epochs of ``train_step()``, validates, checkpoints. It takes
rank and world size from a :class:`DistEnv`, so a test can build one without a process group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import IO, Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from dataio.atomic import atomic_write_text, missing_dirs, remove_made_dirs
from dataio.loader import Batch, build_loader
from dataio.manifest import load_manifest
from models import build_loss, build_model_from_config
from models.registry import unwrap_model
from postproc.curves import parse_log
from trainer import checkpoint as ckpt
from trainer.amp import resolve
from trainer.config import Config
from trainer.dist import (
    DistEnv,
    agree_any,
    agreed_loader,
    all_reduce_sum,
    backend_name,
    broadcast_buffers,
    broadcast_object,
    broadcast_tensors,
    device_for,
    gather_objects,
    on_main,
)
from trainer.ema import WeightEMA
from trainer.metrics import TrainMetrics
from trainer.optim import apply_hyperparameters, build_optimizer, build_scheduler
from trainer.runlock import LOCK, in_use, try_lock
from trainer.validate import GAUGED, Validator, ValTruth

log = logging.getLogger("footprints")
NUM_CLASSES = 3
LOG = "log.jsonl"


class NonFiniteError(RuntimeError):
    pass


def optimizer_steps(batches: int, accum: int) -> int:
    """Optimizer steps of an epoch of ``batches`` loader batches, ``accum`` per step (the last
    step takes what is left)."""
    return -(-batches // accum)


def fill_padding(image: torch.Tensor, valid: list[bool]) -> torch.Tensor:
    """``image`` (NCHW) with each padding slot (``valid`` False) holding a copy of a real sample
    of the batch, in turn; as it is when all or none are real.

    NOTE: the loader's padding slots (a rank's last batch of an epoch) are zero images. In
    training mode BatchNorm normalised the real samples with statistics of those zeros too (a
    batch of 1 real and 3 padding slots: mostly zeros), changing their loss and gradients, and
    pulled its running statistics, which validation and the epoch's checkpoint use, towards
    them once an epoch. Copies keep the batch's shape (a compiled model compiles no other) and
    give BatchNorm the real samples' statistics (exactly, where the copies are even); the masks
    of the slots stay ignored, so the loss is the real samples' alone, as DistributedSampler's
    repeated samples are not. A batch of padding only keeps its buffers (see Trainer._loss)."""
    if all(valid) or not any(valid):
        return image
    real = [i for i, v in enumerate(valid) if v]
    pads = [i for i, v in enumerate(valid) if not v]
    slots = list(range(len(valid)))
    for j, i in enumerate(pads):
        slots[i] = real[j % len(real)]
    return image[torch.tensor(slots, device=image.device)]


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, data: Path, run_dir: Path,
                 device: torch.device | None = None, val_truth: ValTruth | None = None) -> None:
        """``val_truth``: the val split's truth polygons where they were read already (see
        :class:`Validator`)."""
        self.cfg, self.env, self.data, self.run_dir = cfg, env, Path(data), Path(run_dir)
        self.device = device or device_for(env)
        self.manifest = load_manifest(self.data)
        self.data_fingerprint = self.manifest.fingerprint()  # (checked on resume)
        # NOTE: the same seed on every rank gives identical initial weights (DDP also broadcasts
        # rank 0's at wrap time, so this is belt and braces).
        torch.manual_seed(cfg.train.seed)
        model = build_model_from_config(cfg.model, self.manifest.bands, NUM_CLASSES)
        self.model = model.to(self.device)
        self.precision = resolve(cfg.train.amp, self.device)
        self._check_same_precision()
        self.scaler = self.precision.scaler()
        # NOTE: copied from the plain module before DDP wraps it; a resume or train.init_from
        # sets it again from the weights they load
        self.ema = (WeightEMA(unwrap_model(self.model), cfg.train.ema_decay)
                    if cfg.train.ema_decay > 0 else None)
        if env.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.model, device_ids=ids)
        self.net = unwrap_model(self.model)  # the plain module: checkpoints and evaluation
        self.loss_fn = build_loss(cfg.loss, self.manifest.class_frequencies).to(self.device)
        # NOTE: what "auto" became, in every log line and checkpoint: config.json keeps the
        # setting as written (a GPU run's must load for predict on a CPU, see check_device),
        # and a resume on other hardware may change it from one epoch to the next.
        self.runtime = {"amp": self.precision.name, "device": self.device.type,
                        "dist_backend": backend_name()}
        self.optimizer = build_optimizer(self.net.parameters(), cfg.optim)
        self.train_loader = agreed_loader("train", self.data, lambda: build_loader(
            self.data, "train", cfg.data, env.rank, env.world_size, train=True,
            device=self.device))
        try:
            self.steps_per_epoch = len(self.train_loader)
            self.scheduler = build_scheduler(self.optimizer, cfg.optim,
                                             cfg.train.epochs * self.optimizer_steps_per_epoch)
            self.validator = Validator(cfg, env, self.data, self.device, self.precision,
                                       self.loss_fn, val_truth)
            self.metrics = TrainMetrics(env, cfg.metrics.port, cfg.metrics.address)
        except BaseException:
            # NOTE: train() closes the train loader; a refusal here (the val split's agreed
            # loader) never reached it, and the DALI pipeline's threads, left running into the
            # interpreter's exit, aborted the process ("terminate called without an active
            # exception", exit -6, not the refusal's 2)
            self.train_loader.close()
            raise
        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0  # steps of the current epoch completed
        self.global_step = 0
        self.best_f1 = -math.inf
        self.best_step: int | None = None  # the global step of the checkpoint best.pt should be
        self.nonfinite_run = 0
        # The current accumulation group (train.grad_accum_steps): its batches done so far (0
        # between optimizer steps), its size, and whether all their losses were finite here.
        self._accumulated, self._group_size, self._group_finite = 0, 1, True
        self.history: list[dict[str, Any]] = []
        # train.init_from's checkpoint as this run loaded it ({"path", "global_step"}; None for
        # weights of its own), kept in every checkpoint: a resume keeps the record.
        self.init_source: dict[str, Any] | None = None
        # validations in a row that did not beat best_f1 (train.early_stop_patience); kept in
        # every checkpoint, so that a resume of a run that stopped early stays stopped
        self.validations_since_best = 0
        # times this run resumed from a checkpoint, kept in every checkpoint: each resume is a
        # new process, whose own count (footprints_resumes_total) was never more than 1
        self.resumes = 0
        self.stopped_early = False
        # This rank's figures of the epoch so far (loss sum, loader batches, samples) and the
        # epoch's start on the perf_counter clock: kept across a mid-epoch resume, so the epoch's
        # log line covers all of it, not only the steps after the restart.
        self._totals = torch.zeros(3, dtype=torch.float64)
        self._t_epoch = 0.0
        self._resumed_seconds = 0.0

    def _check_same_precision(self) -> None:
        """Raise on every rank unless every rank resolved ``train.amp`` to the same precision.

        NOTE: "auto" resolves on each rank's own GPU, so a job over nodes of two GPU generations
        trained its ranks in bf16 (Ampere on) and in fp16 with a GradScaler (before). A step the
        scaler finds overflowing is then skipped on the fp16 ranks alone, while the bf16 ranks
        take it: DDP all-reduces gradients but never compares weights, so the ranks' weights
        part without a word (and rank 0's checkpoint holds only its own). Before the DDP wrap,
        so that a refusal leaves no DDP model holding the process group."""
        names = gather_objects(self.precision.name)
        if len(set(names)) > 1:
            ranks = ", ".join(f"rank {r}: {name}" for r, name in enumerate(names))
            raise ValueError(
                f"train.amp={self.cfg.train.amp} gives the ranks different precisions ({ranks}): "
                "their GPUs differ; set train.amp=fp16 (any GPU) or bf16 (Ampere and later) so "
                "that every rank trains in the same one")

    # ---- the loop ------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Train to ``train.epochs`` (resuming if the run directory has a checkpoint)."""
        # NOTE: one trainer per run directory (two would interleave their checkpoints); held by
        # rank 0 until train() returns or the process dies. First, so that a second trainer is
        # told who holds the run rather than that the metrics port is taken.
        made = missing_dirs(self.run_dir) if self.env.is_main else []
        had = set(os.listdir(self.run_dir)) if self.env.is_main and not made else set()
        lock = on_main(self.env, f"locking {self.run_dir}", self._lock_run_dir)
        try:
            return self._train()
        except BaseException:
            if self.env.is_main:
                self._undo_start(made, had)
            raise
        finally:
            if lock is not None:
                lock.close()

    def _undo_start(self, made: list[Path], had: set[str]) -> None:
        """Rank 0, when :meth:`train` fails, the lock still held: a start that wrote nothing
        (refused at the metrics port, stopped by a Ctrl-C) removes the lock file it made, and
        the run directory and parents it made, where they are empty.

        NOTE: the run directory is made for the lock, before the checks that follow it: a run
        refused there left an empty run directory (but for ``.lock``). A directory that was
        there stays, as does anything this run did not make; a run that wrote something (a
        config.json, a checkpoint) keeps it for the rerun that resumes from it.

        NOTE: a race left open: a second trainer on the same new run directory, started at
        this moment, can find it removed between its mkdir and the open of its ``.lock`` (an
        error naming ``.lock``; its rerun starts). One that opened the old ``.lock`` first is
        refused as locked; one later makes a new ``.lock``, and the directory stays."""
        try:
            now = set(os.listdir(self.run_dir))
        except OSError:
            return
        if now - had - {LOCK}:
            return
        if LOCK not in had:
            with contextlib.suppress(OSError):
                (self.run_dir / LOCK).unlink()
        remove_made_dirs(made)

    def _train(self) -> dict[str, Any]:
        # NOTE: rank 0 alone binds the port; all ranks stop together if it cannot.
        on_main(self.env, "starting the metrics endpoint", self.metrics.start)
        try:
            resumed = self.resume()
            self.metrics.begin(self.epoch, self.optimizer.param_groups[0]["lr"], self.resumes)
            if not resumed and self.cfg.train.init_from:
                self.init_weights()
            elif resumed and self.cfg.train.init_from and self.env.is_main:
                log.info("train.init_from=%s ignored: the run resumes from its own checkpoint "
                         "(init_from only starts a fresh run; fine-tune again in a new --run-dir)",
                         self.cfg.train.init_from)
            # NOTE: only once resume() accepted the checkpoint: a refused one (other model.*
            # settings) must leave the run's config, which predict builds its model from.
            on_main(self.env, "writing config.json", self._write_config)
            self.stopped_early = self._patience_spent()
            if self.epoch >= self.cfg.train.epochs:  # (a rerun said 'training ...', then nothing)
                log.info("already trained %d epochs (train.epochs=%d); nothing to do (raise "
                         "train.epochs to train on)", self.epoch, self.cfg.train.epochs)
            elif self.stopped_early:
                log.info("the run stopped early after epoch %d; nothing to do (%s)", self.epoch,
                         self._early_stop_reason())
            else:
                log.info("training %s (%s) on %d x %s, %d steps/epoch%s, amp %s",
                         self.cfg.model.name,
                         f"{sum(p.numel() for p in self.net.parameters()) / 1e6:.2f}M params",
                         self.env.world_size, self.device.type, self.optimizer_steps_per_epoch,
                         self._accumulation_note(), self.precision.name)
                if self.ema is not None and self.env.is_main:
                    log.info("train.ema_decay=%g: validation, best.pt, trainer.predict, "
                             "trainer.export and train.init_from use the weight EMA",
                             self.ema.decay)
                self._warn_if_warmup_fills_the_run()
            while self.epoch < self.cfg.train.epochs and not self.stopped_early:
                summary = self.train_epoch()
                self.epoch += 1
                self.step_in_epoch = 0
                every = self.cfg.train.val_every
                if every and (self.epoch % every == 0 or self.epoch == self.cfg.train.epochs):
                    summary.update(self._validate())
                self.end_epoch(summary)
            return self.history[-1] if self.history else {}
        finally:
            self.metrics.stop()
            self.train_loader.close()

    def _validate(self) -> dict[str, Any]:
        """The validation figures, and which weights they scored: ``val_weights`` is "ema" or
        "model" (none without a validation).

        NOTE: a resume may turn train.ema_decay on or off, so one run's log.jsonl can hold
        both kinds of validation; the marker says which each epoch's scores are."""
        scores = self.validator.run(self._scored_net())
        if not scores:  # (off, or an empty val split)
            return {}
        return {**scores, "val_weights": "model" if self.ema is None else "ema"}

    def _scored_net(self) -> torch.nn.Module:
        """The module validation scores: the weight EMA when train.ema_decay is on, else the
        plain module; on every rank with rank 0's BatchNorm statistics, the ones its
        checkpoint holds (see ``dist.broadcast_buffers``)."""
        if self.validator.enabled:  # (a collective: the same on every rank)
            # (the raw ones too: a resumed run starts from rank 0's, so an uninterrupted one
            # validates with them as well; training is unchanged, since DDP hands every rank
            # rank 0's before its next forward anyway)
            broadcast_buffers(self.net)
            if self.ema is not None:
                self.ema.sync_buffers()
        return self.net if self.ema is None else self.ema.module

    @property
    def optimizer_steps_per_epoch(self) -> int:
        """One per ``train.grad_accum_steps`` loader batches (``steps_per_epoch``), the epoch's
        last group possibly shorter: the unit of ``global_step`` and of the schedule."""
        return optimizer_steps(self.steps_per_epoch, self.cfg.train.grad_accum_steps)

    def _accumulation_note(self) -> str:
        accum = self.cfg.train.grad_accum_steps
        return (f" (train.grad_accum_steps={accum}: {self.steps_per_epoch} batches)"
                if accum > 1 else "")

    def _warn_if_warmup_fills_the_run(self) -> None:
        """A warm-up as long as the run (a GPU preset's 500 steps on a short or small run) left
        the learning rate rising all the way, below ``optim.lr``, and the cosine never began,
        without a word. A warning, not an error: short demo and test runs keep their preset."""
        total = self.cfg.train.epochs * self.optimizer_steps_per_epoch
        warmup = self.cfg.optim.warmup_steps
        if warmup >= total and self.env.is_main:
            log.warning("optim.warmup_steps=%d fills the whole run (train.epochs=%d x %d "
                        "steps/epoch%s = %d steps): the learning rate rises throughout and "
                        "reaches %.3g of optim.lr=%g at the last step%s; lower "
                        "optim.warmup_steps", warmup, self.cfg.train.epochs,
                        self.optimizer_steps_per_epoch, self._accumulation_note(), total,
                        total / warmup, self.cfg.optim.lr, ", so the cosine decay never starts"
                        if self.cfg.optim.schedule == "cosine" else "")

    def train_epoch(self) -> dict[str, Any]:
        self.train_loader.set_epoch(self.epoch)
        self.metrics.epoch.set(self.epoch)
        if self.step_in_epoch == 0:
            self._totals.zero_()
            self._resumed_seconds = 0.0
        self._t_epoch = time.perf_counter() - self._resumed_seconds
        totals = self._totals
        # the current group's (loss sum, batches, samples): into totals once its step is taken
        group = torch.zeros(3, dtype=torch.float64)
        # NOTE: closed however the epoch ends: a Ctrl-C left it open on the terminal's line,
        # and the 'interrupted; rerun ...' line was printed onto the end of the bar.
        with tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, leave=False,
                  desc=f"epoch {self.epoch + 1}/{self.cfg.train.epochs}", unit="batch",
                  disable=not self.env.is_main) as bar:
            t_ready = time.perf_counter()
            for batch in self.train_loader:
                t_got = time.perf_counter()
                loss = self.train_step(batch)
                t_done = time.perf_counter()
                n = int(batch.valid.sum())
                # NOTE: a batch of padding only (more ranks than samples left) has a loss of 0 by
                # definition, not a measurement: counted, it would lower the epoch's train_loss.
                if loss is not None and n > 0:
                    group += torch.tensor([loss, 1.0, n], dtype=torch.float64)
                self.metrics.record_step(n, t_done - t_ready, t_got - t_ready,
                                         loss if loss is not None else float("nan"))
                self.step_in_epoch += 1
                bar.update()
                # NOTE: the rest only between optimizer steps (the same loader batches on every
                # rank: the loader pads all ranks to as many): a mid-epoch checkpoint never
                # splits a group, and log_every's metric sync is a collective.
                if self._accumulated == 0:
                    if loss is not None:  # a skipped group counts for nothing, as a skipped step
                        totals += group
                    group.zero_()
                    self.global_step += 1
                    if self.global_step % self.cfg.train.log_every == 0:
                        self._sync_metrics(bar, loss)
                    every = self.cfg.train.checkpoint_every_steps
                    mid_epoch = self.step_in_epoch < self.steps_per_epoch
                    if every and self.global_step % every == 0 and mid_epoch:
                        self.save_checkpoint(best=False)
                t_ready = time.perf_counter()
        self._sync_metrics(None, None)
        loss_sum, steps, samples = all_reduce_sum(totals).tolist()
        seconds = time.perf_counter() - self._t_epoch
        return {"epoch": self.epoch + 1, "global_step": self.global_step,
                "train_loss": loss_sum / max(steps, 1), "lr": self.optimizer.param_groups[0]["lr"],
                "samples": int(samples), "samples_per_s": samples / max(seconds, 1e-9),
                "seconds": seconds, **self.runtime}

    def train_step(self, batch: Batch) -> float | None:
        """One loader batch's forward and backward, and after the last batch of its group (every
        ``train.grad_accum_steps`` batches, and at the epoch's end) the optimizer step. Returns
        the local loss, or None when all ranks agreed to skip the group (the losses its earlier
        batches returned then count for nothing either)."""
        self.model.train()
        if self._accumulated == 0:
            self.optimizer.zero_grad(set_to_none=True)
            # NOTE: the epoch's last group takes what is left (fewer batches), each divided by
            # that count: every rank has as many batches, so all agree where groups end.
            left = self.steps_per_epoch - self.step_in_epoch
            self._group_size = max(1, min(self.cfg.train.grad_accum_steps, left))
            self._group_finite = True
        if self._accumulated + 1 < self._group_size:
            return self._accumulate(batch)
        self._accumulated = 0
        loss = self._loss(batch)
        # NOTE: decide before the group's last backward, together: a NaN on one rank would
        # otherwise be averaged into every rank's gradients by DDP's all-reduce.
        if agree_any(not (self._group_finite and bool(torch.isfinite(loss)))):
            return self._skip("nonfinite_loss")
        self._backward(loss)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.grad_clip or math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), clip)
        # Gradients are identical on all ranks after DDP's all-reduce, so this test agrees.
        if not bool(torch.isfinite(norm)):
            if self.scaler is not None:  # fp16 overflow: the scaler skips and lowers its scale
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.metrics.skip_step("fp16_overflow")
                return None
            return self._skip("nonfinite_grad")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:  # (a skipped step, returned above, leaves it as it was)
            self.ema.update(self.net)
        self.nonfinite_run = 0
        return float(loss.detach())

    def _accumulate(self, batch: Batch) -> float:
        """A batch of a group other than its last: its gradients added, its local loss returned.

        NOTE: no all-reduce (DDP's no_sync, around the forward too) nor any agreement here: the
        group's last backward all-reduces the accumulated gradients, and whether all the group's
        losses were finite is agreed on once, before it (one collective per optimizer step)."""
        sync = (self.model.no_sync() if isinstance(self.model, DistributedDataParallel)
                else contextlib.nullcontext())
        with sync:
            loss = self._loss(batch)
            self._backward(loss)
        self._accumulated += 1
        value = float(loss.detach())  # (after the backward is queued)
        self._group_finite = self._group_finite and math.isfinite(value)
        return value

    def _loss(self, batch: Batch) -> torch.Tensor:
        """The batch's training loss; its padding slots reach neither the loss (their masks are
        ignored) nor BatchNorm (see :func:`fill_padding`)."""
        valid = batch.valid.tolist()
        # A batch of padding only (the forward still runs: DDP's backward needs every rank's)
        # keeps BatchNorm's running statistics; its num_batches_tracked counts on, as every
        # rank's does (the EMA copies it: ranks that counted apart held two EMAs).
        stats = [] if any(valid) else [b for b in self.net.buffers() if b.is_floating_point()]
        kept = [b.detach().clone() for b in stats]
        with self.precision.autocast():
            logits = self.model(fill_padding(batch.image, valid))
        # NOTE: through .data: the graph holds the buffers as batch_norm's inputs (an in-place
        # copy_ fails the backward's version check), though training mode reads the batch's own
        # statistics, and a batch of padding only has zero gradients anyway
        for b, old in zip(stats, kept, strict=True):
            b.data.copy_(old)
        return self.loss_fn(logits, batch.mask)

    def _backward(self, loss: torch.Tensor) -> None:
        """Accumulate ``loss``'s gradients, divided by the group's size: the step's gradient is
        then the mean of its batches', like one batch of all their samples (up to what is per
        batch, as on DDP's ranks: the Dice term, BatchNorm statistics, the weighted cross
        entropy's normaliser). fp16: every backward is scaled; unscaling, clipping and the step
        come once, after the last."""
        if self._group_size > 1:  # (N = 1: the loss as it is, no extra op)
            loss = loss / self._group_size
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _skip(self, reason: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_run += 1
        self.metrics.skip_step(reason)
        if self.env.is_main:  # an agreed decision: one line, not one per rank
            log.warning("step %d skipped on all ranks (%s), %d in a row", self.global_step,
                        reason, self.nonfinite_run)
        if self.nonfinite_run >= self.cfg.train.max_nonfinite_steps:
            raise NonFiniteError(
                f"{self.nonfinite_run} consecutive steps had a non-finite loss or gradients "
                f"(last: {reason}); stopping. Lower optim.lr, set optim.grad_clip, or check the "
                "data (the last good checkpoint is kept)")
        return None

    def _sync_metrics(self, bar: tqdm | None, loss: float | None) -> None:
        self.metrics.lr.set(self.optimizer.param_groups[0]["lr"])
        self.metrics.record_memory(self.device)
        self.metrics.set_skipped_samples(self.train_loader.stats.as_dict()["samples_skipped"])
        self.metrics.sync()
        if bar is not None and loss is not None:
            bar.set_postfix(loss=f"{loss:.4f}")

    # ---- epoch end: log, checkpoint ------------------------------------------------------------
    def end_epoch(self, summary: dict[str, Any]) -> None:
        summary["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        f1 = summary.get("val_f1")
        score = f1 if f1 is not None else summary.get("val_iou")
        is_best = score is not None and score > self.best_f1
        if is_best:
            self.best_f1 = score
        # NOTE: a new best always resets the count; one that is not counts only after the
        # warm-up (train.early_stop_start_epoch). The warm-up's validations still set the best
        # (best.pt is about the best weights), so the count after it is against that best.
        if is_best:
            self.validations_since_best = 0
        elif score is not None and self.epoch > self.cfg.train.early_stop_start_epoch:
            self.validations_since_best += 1
        for k in GAUGED:
            if k in summary:  # (a class without an IoU, None: NaN, Prometheus' "no value")
                v = summary[k]
                self.metrics.val.labels(metric=k[4:]).set(math.nan if v is None else v)
        self.history.append(summary)
        on_main(self.env, "writing the training log", lambda: self._append_log(summary))
        if self.env.is_main:
            log.info("epoch %d/%d  loss %.4f  %s %.1f samples/s  %.0fs", summary["epoch"],
                     self.cfg.train.epochs, summary["train_loss"],
                     "  ".join(f"{k} {summary[k]:.4f}" for k in ("val_loss", "val_iou", "val_f1")
                               if k in summary), summary["samples_per_s"], summary["seconds"])
        # without validation (val_every 0, or an empty val split) the newest is the one to use
        self.save_checkpoint(best=is_best or not self.validator.enabled)
        self.stopped_early = self._patience_spent()
        if self.stopped_early and self.env.is_main and self.epoch < self.cfg.train.epochs:
            log.info("stopping early after epoch %d (%s)", self.epoch,
                     self._early_stop_reason())

    def _patience_spent(self) -> bool:
        """Have ``train.early_stop_patience`` validations in a row not beaten the best score?

        NOTE: the scores come from counts summed over all ranks, so every rank counts alike;
        agreed all the same, as every stop decision is: a rank that stopped alone would leave
        the others waiting at their next collective until the process-group timeout.
        """
        patience = self.cfg.train.early_stop_patience
        return patience > 0 and agree_any(self.validations_since_best >= patience)

    def _early_stop_reason(self) -> str:
        metric = "val_f1" if self.cfg.train.val_f1 else "val_iou"
        return (f"{metric} has not beaten its best, {self.best_f1:.4f} at step {self.best_step} "
                f"(best.pt), for {self.validations_since_best} validations: "
                f"train.early_stop_patience={self.cfg.train.early_stop_patience}; raise it, or "
                "set it to 0, to train on")

    def _append_log(self, summary: dict[str, Any]) -> None:
        with open(self.run_dir / LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(summary) + "\n")

    def state(self) -> dict[str, Any]:
        return {
            "format": ckpt.FORMAT,
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step, "best_score": self.best_f1,
            "loader": self.train_loader.state_dict(),
            "world_size": self.env.world_size, "steps_per_epoch": self.steps_per_epoch,
            "config": self.cfg.to_json(), "runtime": self.runtime,
            "data": self.data_fingerprint,
            # NOTE: the normalisation the weights were trained with, for trainer.predict: another
            # dataset's manifest (a new AOI prepared on its own) has percentiles of its own.
            "percentiles": dict(zip(("p2", "p98"), self.manifest.percentiles(), strict=True)),
            # (the imagery they are of: trainer.predict refuses a dataset of another product)
            "product": self.manifest.product,
            "init_from": self.init_source,
            "validations_since_best": self.validations_since_best,
            "resumes": self.resumes,
            # (rank 0's: the others' BatchNorm statistics in it may differ until the next use)
            **({ckpt.EMA: self.ema.state_dict()} if self.ema is not None else {}),
        }

    def save_checkpoint(self, best: bool) -> None:
        """Rank 0 writes (temp + rename); every rank contributes its RNG state and its figures
        of the epoch so far first."""
        parts = gather_objects((ckpt.rng_state(), self._totals.tolist()))

        def write() -> None:
            state = self.state()
            state["rng"] = [rng for rng, _ in parts]
            # summed over ranks: the epoch's line sums them anyway, whatever the world size
            state["epoch_totals"] = [sum(t[i] for _, t in parts) for i in range(3)]
            state["epoch_seconds"] = time.perf_counter() - self._t_epoch
            # NOTE: the best as of this checkpoint, so that a resume can redo a mark_best that a
            # crash right after this commit skipped (best_score already counts this epoch).
            state["best_step"] = self.global_step if best else self.best_step
            path = ckpt.checkpoint_path(self.run_dir, self.global_step)
            seconds = ckpt.save(state, path)
            self.metrics.checkpoint_time.observe(seconds)
            if best:
                ckpt.mark_best(path)
            ckpt.prune(self.run_dir, self.cfg.train.keep_last)

        # NOTE: nobody proceeds until the checkpoint is committed, so a failure after this point
        # can always resume from it; a failed write stops every rank with its reason.
        on_main(self.env, "writing a checkpoint", write)
        if best:
            self.best_step = self.global_step

    def resume(self) -> bool:
        """Load the newest complete checkpoint of the run directory, if any (all ranks agree).
        Rank 0 also repairs what a killed run left: temp files, best.pt, the log's last lines."""
        def find() -> tuple[dict[str, Any], Path] | None:
            # NOTE: rank 0 is this run's only checkpoint writer and has not written yet, so any
            # temp file now is a leftover of a killed worker (torchrun stops the old group first).
            ckpt.remove_temp_files(self.run_dir)
            return ckpt.load_latest(self.run_dir)

        found = on_main(self.env, "looking for a checkpoint", find)
        path = broadcast_object(str(found[1]) if found else None)
        if path is None:
            # lines of epochs whose checkpoint was never committed
            on_main(self.env, "cleaning the training log", self._clean_log)
            return False
        state = found[0] if found else ckpt.load(Path(path))
        model_cfg = dataclasses.asdict(self.cfg.model)
        ckpt.check_resume(state, Path(path), self.manifest, self.net.state_dict(), model_cfg,
                          self.cfg.optim.name)
        ckpt.load_model(self.net, state, Path(path), ckpt.RESUME_HINT, model_cfg)
        self.optimizer.load_state_dict(state["optimizer"])
        apply_hyperparameters(self.optimizer, self.cfg.optim)
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.best_f1 = state["global_step"], state["best_score"]
        self.best_step = state.get("best_step")
        self.init_source = state.get("init_from")
        self.validations_since_best = int(state.get("validations_since_best", 0))
        if self.step_in_epoch:
            self.train_loader.load_state_dict(state["loader"])
            # The loader re-derives its position when the world size or batch size changed;
            # the epoch's step count must follow it (progress bar, mid-epoch checkpoints).
            self.step_in_epoch = self.train_loader.state_dict()["step"]
            if self.env.is_main and "epoch_totals" in state:
                self._totals = torch.tensor(state["epoch_totals"], dtype=torch.float64)
            self._resumed_seconds = float(state.get("epoch_seconds", 0.0))
        self.scheduler = self._resumed_scheduler(state)
        self._resume_ema(state, Path(path))
        if state.get("world_size") == self.env.world_size and len(state["rng"]) > self.env.rank:
            ckpt.set_rng_state(state["rng"][self.env.rank])
        on_main(self.env, "repairing the run directory", self._repair)
        # NOTE: the run's count, not this process's: a counter that starts again at 1 in every
        # restarted process read 1 after any number of resumes, and increase() saw no change
        # (1 -> 1). A resume that dies before its first checkpoint is not carried on.
        self.resumes = int(state.get("resumes", 0)) + 1
        log.info("resumed from %s (%d epochs done, %d steps into the next)", path, self.epoch,
                 self.step_in_epoch)
        return True

    def _resume_ema(self, state: dict[str, Any], path: Path) -> None:
        """The weight EMA as the checkpoint left it; started from the resumed weights if it has
        none (an older run, or one without train.ema_decay), dropped if this run has none."""
        if self.ema is None:
            if ckpt.has_ema(state) and self.env.is_main:
                log.info("%s has a weight EMA and train.ema_decay=0: it is dropped; validation "
                         "scores the raw weights from here (best.pt stays the EMA's until they "
                         "beat its score)", path)
            return
        if not ckpt.has_ema(state):
            self.ema.reset(self.net)
            if self.env.is_main:
                log.info("train.ema_decay=%g: %s has no weight EMA; it starts from the resumed "
                         "weights", self.ema.decay, path)
            return
        ckpt.load_model(self.ema.module, ckpt.scored(state), path, "this config's model.* "
                        "settings (its weight EMA); resume with the run's config or start a new "
                        "--run-dir", dataclasses.asdict(self.cfg.model))
        self.ema.updates = int(state[ckpt.EMA]["updates"])

    def init_weights(self) -> None:
        """A fresh run's weights from ``train.init_from``, and nothing else of its checkpoint: the
        optimizer, scaler, schedule (its warm-up from step 0), step, epoch, best score, loader and
        RNG start as in any new run. Rank 0 reads the file; every rank takes its weights.

        NOTE: the inputs are normalised with this run's --data percentiles (its manifest), as in
        any run, not the source's: the fine-tuned weights adapt to them, and its checkpoints
        record them for trainer.predict.
        """
        def read() -> dict[str, Any]:
            path = ckpt.source_checkpoint(self.cfg.train.init_from)
            try:
                state = ckpt.load(path, mmap=True)  # (its model alone is read: see train.py)
                ckpt.check_init_from_product(state, path, self.manifest)
                # NOTE: the weights its validation scored, best.pt's choice: its EMA if it has one
                ckpt.load_model(self.net, ckpt.scored(state), path,
                                ckpt.init_from_hint(self.manifest),
                                dataclasses.asdict(self.cfg.model))
            except ValueError as e:  # (each names the file)
                raise ValueError(f"train.init_from: {e}") from None
            step = state.get("global_step")
            # ("ema": its weight EMA was taken; only then, so other records read as before)
            return {"path": str(path.resolve()),
                    "global_step": step if isinstance(step, int) else None,
                    **({"ema": True} if ckpt.has_ema(state) else {})}

        source = broadcast_object(on_main(self.env, "loading train.init_from", read))
        # NOTE: rank 0's weights, not each rank's own read: a best.pt that a source run still
        # training re-marks in between would have started the ranks from two checkpoints.
        broadcast_tensors(list(self.net.state_dict().values()))
        if self.ema is not None:  # (this run's average starts from the weights it starts from)
            self.ema.reset(self.net)
        self.init_source = source
        if self.env.is_main:
            path = Path(source["path"])
            run = path.parent.parent if path.parent.name == ckpt.CKPT_DIR else path.parent
            log.info("initialised from %s (step %s of %s%s)", path, source["global_step"], run,
                     ", its weight EMA" if source.get("ema") else "")

    def _resumed_scheduler(self, state: dict[str, Any]) -> torch.optim.lr_scheduler.LambdaLR:
        """The schedule of this run's plan (``train.epochs`` x this world's optimizer steps per
        epoch), at the saved point of it: the applied steps, scaled by the change in steps per
        epoch (world size, batch size or ``train.grad_accum_steps``). A resize keeps its place
        on the cosine. More epochs keep the step and lengthen the plan, so
        the learning rate moves up to the new plan's value at that step (as when extending a
        finished cosine run); either way it reaches the floor at the last step, not before."""
        done = int(state["scheduler"]["last_epoch"])
        # NOTE: in optimizer steps: the saved run's loader batches per epoch, grouped by its
        # train.grad_accum_steps (1 before the key existed), which a resume may change.
        saved_accum = json.loads(state.get("config") or "{}").get("train", {}).get(
            "grad_accum_steps", 1)
        saved_spe = optimizer_steps(int(state.get("steps_per_epoch") or self.steps_per_epoch),
                                    int(saved_accum))
        if saved_spe != self.optimizer_steps_per_epoch:
            done = round(done * self.optimizer_steps_per_epoch / saved_spe)
        return build_scheduler(self.optimizer, self.cfg.optim,
                               self.cfg.train.epochs * self.optimizer_steps_per_epoch,
                               start_step=done)

    def _lock_run_dir(self) -> IO[str] | None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.run_dir / LOCK, "a+", encoding="utf-8")  # noqa: SIM115 (held open)
        try:
            owner = try_lock(f)
        except OSError as e:  # a file system without locks (some NFS mounts): go on unlocked
            f.close()
            log.warning("%s: cannot lock the run directory (%s); make sure no other trainer "
                        "uses it", self.run_dir / LOCK, e)
            return None
        if owner is not None:
            f.close()
            raise ValueError(in_use(self.run_dir, owner))
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        return f

    def _write_config(self) -> None:
        atomic_write_text(self.run_dir / "config.json", self.cfg.to_json() + "\n")

    def _repair(self) -> None:
        """What a killed run may have left: best.pt not yet moved, log lines past the state."""
        if self.best_step is not None:
            ckpt.repair_best(self.run_dir, self.best_step)
        self._clean_log()

    def _clean_log(self) -> None:
        """Keep one line per epoch that the resumed state contains (``self.epoch``, 0 without a
        checkpoint): later epochs will be redone, and a line torn by a crash would otherwise have
        the next line appended onto it."""
        path = self.run_dir / LOG
        if not path.exists():
            return
        text = path.read_text(encoding="utf-8", errors="replace")
        records = [r for r in parse_log(text, path, repair=True) if int(r["epoch"]) <= self.epoch]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
        self.history = records

