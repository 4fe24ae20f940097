"""The DALI backend: Python reads the planned samples' bytes, DALI decodes and augments them.

The graph, for a CPU pipeline (``device_id=None``) and a GPU one (``device_id=local_rank``) alike:

    external_source (CPU): crop rows (uint16 HWC), mask.png bytes, per-sample parameters
    decoders.image(GRAY) on the CPU   (NOTE: "mixed" decodes only JPEG/JPEG2000 on the GPU)
    .gpu() on a GPU machine; from here on every op runs where the data is
    flip(mask, vertical)              the full mask, so the crop below stays one pass
    crop_mirror_normalize             crop + horizontal flip + (x - mean) / std + HWC->CHW, or
                                      HWC->CWH (the transpose) in the same pass, chosen per
                                      sample under a conditional (only when rot90 is on)

then, in torch on the output device, ``clamp(0, 1)`` fused with the copy out of DALI's buffer
(DALI's arithmetic ops are several times slower than that on the CPU) and, in the rare batch that
mixes sizes, padding (a DALI ``fn.pad`` under a conditional cost ~0.3 ms per sample even when
nothing needed padding; measured, 2 cores). Parameters come from :mod:`dataio.augment`, not from
DALI's random ops, so the stream is reproducible and restorable.

A mask that does not decode kills a DALI pipeline ("no longer valid"; there is no skip-on-error).
We skip rather than stop: on a pipeline error the samples in flight are checked in Python, the
ones that fail are remembered as bad for the life of the loader (counted, with a warning naming
shard and key), the pipeline is rebuilt and the epoch continues at the failed step with those
slots empty (``valid=False``, like padding), so the epoch keeps its length on every rank. An error
that no sample explains is raised as :class:`DataError` naming the shards and keys in flight.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from dataio.hostpool import HostPool
from dataio.plan import EpochPlan, RawBatch, StepInputs, StepRecord, empty_batch, prepare_step
from dataio.reader import SampleError, ShardReader
from dataio.sharding import DataError

log = logging.getLogger(f"footprints.{__name__}")  # under the trainer: its [rank N] handler


# external_source outputs: name, DALI type, ndim ("t" only when the graph transposes).
_INPUTS = (("img", "UINT16", 3), ("png", "UINT8", 1), ("crop", "FLOAT", 1),
           ("pos_x", "FLOAT", 0), ("mask_y", "FLOAT", 0), ("h", "INT32", 0), ("v", "INT32", 0),
           ("t", "BOOL", 0), ("mean", "FLOAT", 1), ("std", "FLOAT", 1), ("tag", "INT64", 0))


def _inputs(transposes: bool) -> list[tuple[str, str, int]]:
    return [i for i in _INPUTS if transposes or i[0] != "t"]


def _graph(source: object, gpu: bool, transposes: bool) -> tuple:
    """The pipeline body (traced by DALI; ``transposes`` adds the per-sample conditional)."""
    from nvidia.dali import fn, types

    spec = _inputs(transposes)
    nodes = fn.external_source(
        source=source, num_outputs=len(spec), batch=True, no_copy=True,
        layout=["HWC"] + [""] * (len(spec) - 1),
        dtype=[getattr(types, d) for _, d, _ in spec], ndim=[n for _, _, n in spec])
    # NOTE: DALI's autograph replaces zip() with one that takes no strict=.
    x = {name: nodes[i] for i, (name, _, _) in enumerate(spec)}
    img, mask = x["img"], fn.decoders.image(x["png"], output_type=types.GRAY)
    if gpu:
        img, mask = img.gpu(), mask.gpu()
    mask = fn.flip(mask, horizontal=0, vertical=x["v"])  # NOTE: horizontal defaults to 1

    def cmn(layout: str) -> tuple:
        out = (fn.crop_mirror_normalize(img, crop=x["crop"], crop_pos_x=x["pos_x"],
                                        crop_pos_y=0.0, mirror=x["h"], mean=x["mean"],
                                        std=x["std"], output_layout=layout, dtype=types.FLOAT),
               fn.crop_mirror_normalize(mask, crop=x["crop"], crop_pos_x=x["pos_x"],
                                        crop_pos_y=x["mask_y"], mirror=x["h"], mean=0.0,
                                        std=1.0, output_layout=layout, dtype=types.UINT8))
        return tuple(fn.reshape(o, layout="CHW") for o in out) if layout == "CWH" else out

    if transposes:
        if x["t"]:
            img, mask = cmn("CWH")
        else:
            img, mask = cmn("CHW")
    else:
        img, mask = cmn("CHW")
    return img, mask, x["tag"]


def _feed_lists(inputs: StepInputs, bs: int, transposes: bool) -> list[list[np.ndarray]]:
    """The external_source batches for one step (only the slots that hold a sample)."""
    names = [name for name, _, _ in _inputs(transposes)]
    out: dict[str, list[np.ndarray]] = {name: [] for name in names}
    step = inputs.record.step
    for it in inputs.items:
        g = it.geom
        values = {"img": it.rows, "png": np.frombuffer(it.mask, np.uint8),
                  "crop": np.array([g.ch, g.cw], np.float32),
                  "pos_x": np.array(g.rel_x(), np.float32),
                  "mask_y": np.array(g.rel_mask_y(), np.float32),
                  "h": np.array(g.h, np.int32), "v": np.array(g.v, np.int32),
                  "t": np.array(g.t), "mean": it.mean, "std": it.std,
                  "tag": np.array(step * bs + it.slot, np.int64)}
        for name in names:
            out[name].append(values[name])
    return [out[name] for name in names]


class _Feed:
    """The ``external_source`` callback: one planned step per call, records kept in order.

    DALI calls it inside ``run()``, on the training process's main thread, so reading there never
    overlaps the training step (on an H200 it was ~10 ms of a ~12 ms data wait a batch of 16 at
    512 px). A thread of its own reads the next ``ahead`` steps instead (``data.read_ahead``; 0
    reads here); the callback hands over what is read, in plan order, and raises what a read
    raised when its step is asked for.
    """

    def __init__(self, reader: ShardReader, transposes: bool, keep: int, ahead: int) -> None:
        self.reader, self.transposes, self.keep, self.ahead = reader, transposes, keep, ahead
        self.plan: EpochPlan | None = None
        self.next = 0  # the next step handed to DALI
        # Steps handed to DALI and not yet consumed; each keeps its input arrays alive
        # (no_copy=True: DALI reads them in place).
        self.pending: collections.deque[StepInputs] = collections.deque()
        # Reads submitted, in step order, from step ``next`` on.
        self._reads: collections.deque[Future[StepInputs]] = collections.deque()
        self._pool: ThreadPoolExecutor | None = None
        # Row buffers come back here once DALI has produced the step that read them, so the
        # kernel does not fault in fresh pages for every sample. (The reading thread takes them.)
        self._free: dict[tuple[int, ...], list[np.ndarray]] = collections.defaultdict(list)
        self._lock = threading.Lock()

    def alloc(self, shape: tuple[int, int, int]) -> np.ndarray:
        with self._lock:
            free = self._free[shape]
            if free:
                return free.pop()
        return np.empty(shape, np.uint16)

    def done(self, inputs: StepInputs) -> None:
        """DALI is through with this step's inputs: recycle its row buffers."""
        with self._lock:
            for it in inputs.items:
                free = self._free[it.rows.shape]
                if len(free) < self.keep:
                    free.append(it.rows)

    def start(self, plan: EpochPlan, j: int) -> None:
        """Hand over ``plan`` from step ``j`` on (reads of an earlier start are dropped)."""
        self.stop()
        self.plan, self.next = plan, j
        self.pending.clear()
        self._read_ahead()

    def stop(self) -> None:
        """Drop the reads ahead: cancel those not begun, wait for the one running (it fills
        buffers and may consult ``plan.bad``, which the caller is about to change)."""
        while self._reads:
            read = self._reads.pop()
            if not read.cancel():
                with contextlib.suppress(Exception):
                    read.result()

    def _read_ahead(self) -> None:
        plan = self.plan
        while (plan is not None and len(self._reads) < self.ahead
               and self.next + len(self._reads) < plan.steps):
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="dali-feed")
            self._reads.append(self._pool.submit(
                prepare_step, plan, self.next + len(self._reads), self.reader,
                decode_mask=False, alloc=self.alloc))

    def __call__(self) -> list[list[np.ndarray]]:
        plan = self.plan
        while plan is not None and self.next < plan.steps:
            if self._reads:  # start() and every call below keep ``ahead`` reads submitted
                # a failed read stays first: asked for again, it raises again
                inputs = self._reads[0].result()
                self._reads.popleft()
            else:  # read_ahead = 0
                inputs = prepare_step(plan, self.next, self.reader, decode_mask=False,
                                      alloc=self.alloc)
            self.next += 1
            self._read_ahead()
            self.pending.append(inputs)
            if inputs.items:  # a step with no sample never reaches DALI
                return _feed_lists(inputs, plan.batch_size, self.transposes)
        raise StopIteration

    def close(self) -> None:
        self.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class DaliBackend:
    """Runs plans through one DALI pipeline, built once and reset between epochs."""

    def __init__(self, reader: ShardReader, bands: int, batch_size: int, num_threads: int,
                 prefetch: int, device: torch.device, seed: int, pool: HostPool,
                 transposes: bool, read_ahead: int) -> None:
        self.reader, self.bands, self.batch_size = reader, bands, batch_size
        self.transposes = transposes
        self.num_threads, self.prefetch, self.device, self.seed = (num_threads, prefetch,
                                                                   device, seed)
        # Enough row buffers for the batches DALI holds (queue depth + the one being fed + one)
        # and the steps read ahead.
        self.feed = _Feed(reader, transposes, keep=batch_size * (prefetch + 2 + read_ahead),
                          ahead=read_ahead)
        self.pool = pool
        self._pipe = None
        self.rebuilds = 0
        self.fallback_shape: tuple[int, int] = (1, 1)  # for a batch without samples; set by Loader
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _pipeline(self) -> Any:  # a built nvidia.dali Pipeline
        if self._pipe is None:
            from nvidia.dali import pipeline_def

            gpu = self.device.type == "cuda"
            # NOTE: device_id=None is the only CPU-only setting that works (0/-1 fail without
            # CUDA); with CUDA it is the local rank, i.e. this loader's device.
            pipe = pipeline_def(_graph, batch_size=self.batch_size, num_threads=self.num_threads,
                                device_id=self.device.index if gpu else None,
                                prefetch_queue_depth=self.prefetch, seed=self.seed,
                                enable_conditionals=self.transposes)(self.feed, gpu,
                                                                     self.transposes)
            pipe.build()
            self._pipe = pipe
        return self._pipe

    def epoch(self, plan: EpochPlan) -> Iterator[RawBatch]:
        """Yield the plan's batches in order; recovers from samples that DALI cannot decode."""
        self.feed.start(plan, 0)
        finished = False
        try:
            while True:
                try:
                    out = self._pipeline().run()
                except StopIteration:
                    self._pipe.reset()
                    break
                except RuntimeError as e:
                    self._recover(plan, e)
                    continue
                # Steps without samples were skipped by the feed; they come first.
                while not self.feed.pending[0].items:
                    yield self._empty(self.feed.pending.popleft().record)
                inputs = self.feed.pending.popleft()
                raw = self._convert(inputs, out)
                self.feed.done(inputs)
                yield raw
            while self.feed.pending:
                yield self._empty(self.feed.pending.popleft().record)
            finished = True
        finally:
            if not finished:
                # Abandoned mid-epoch (or failed): batches are still in flight; start afresh.
                self._pipe = None
                self.feed.start(plan, plan.steps)

    def _empty(self, record: StepRecord) -> RawBatch:
        shape = record.shape or self.fallback_shape
        return empty_batch(record, self.bands, shape, self.device)

    def _convert(self, inputs: StepInputs, out: tuple) -> RawBatch:
        """DALI's outputs -> owned tensors on the device, clamped, in their batch slots."""
        rec = inputs.record
        img_tl, mask_tl, tag_tl = out
        slots = [it.slot for it in inputs.items]
        tags = np.asarray(tag_tl.as_tensor()).reshape(-1) - rec.step * self.batch_size
        if tags.tolist() != slots:
            raise DataError(f"DALI output out of order at step {rec.step}: slots "
                            f"{tags.tolist()} != {slots}")
        if len(slots) == self.batch_size and not rec.padded_pixels:
            return RawBatch(rec, *self._dense(img_tl, mask_tl))
        # Some slots are empty or some samples smaller than the batch: place them one by one.
        full = empty_batch(rec, self.bands, rec.shape, self.device, torch.int64)
        for k, slot in enumerate(slots):
            image, mask = self._dense(img_tl[k], mask_tl[k])
            _, height, width = image.shape
            full.image[slot, :, :height, :width] = image
            full.mask[slot, :height, :width] = mask[0]
        return full

    def _dense(self, img: object, mask: object) -> tuple[torch.Tensor, torch.Tensor]:
        """A TensorList (N, C, H, W) / (N, 1, H, W) or one sample of it, as owned tensors:
        image clamped to [0, 1], mask int64 without its channel axis for a batch."""
        batch = hasattr(img, "as_tensor")
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            img_t, mask_t = (img.as_tensor(), mask.as_tensor()) if batch else (img, mask)
            image = torch.empty(img_t.shape(), dtype=torch.float32, device=self.device)
            mask8 = torch.empty(mask_t.shape(), dtype=torch.uint8, device=self.device)
            # NOTE: copy on a side stream and wait for it: DALI recycles its output buffers on
            # later iterations. The side stream first waits for the training stream, because the
            # caching allocator may hand back blocks that the training stream's queued kernels
            # (last step's backward) still read: the copy must not overwrite them early.
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            feed_ndarray(img_t, image, cuda_stream=self._copy_stream)
            feed_ndarray(mask_t, mask8, cuda_stream=self._copy_stream)
            self._copy_stream.synchronize()
            mask_out = mask8[:, 0].long() if batch else mask8.long()
            return image.clamp_(0.0, 1.0), mask_out
        # NOTE: zero-copy views of DALI's buffers, valid until the next run(); the clamp and
        # the int64 conversion are the copies out, one pass each, into reused buffers.
        view = torch.from_numpy(np.asarray(img.as_tensor() if batch else img))
        mask_view = torch.from_numpy(np.asarray(mask.as_tensor() if batch else mask))
        if batch:
            mask_view = mask_view[:, 0]
        image = torch.clamp(view, 0.0, 1.0,
                            out=self.pool.empty(tuple(view.shape), torch.float32))
        mask_out = self.pool.empty(tuple(mask_view.shape), torch.int64).copy_(mask_view)
        return image, mask_out

    def _recover(self, plan: EpochPlan, error: RuntimeError) -> None:
        """Find the samples in flight that do not decode, mark them bad and rebuild."""
        self.feed.stop()  # reads ahead would still see the samples about to be marked bad
        in_flight = [s for s in self.feed.pending if s.items]
        if not in_flight:
            raise error
        found = []
        for inputs in in_flight:
            for it in inputs.items:
                sid = inputs.record.ids[it.slot]
                ref = plan.refs[sid]
                try:
                    self.reader.mask(ref, self.reader.header(ref))
                except SampleError as e:
                    log.warning("DALI cannot decode sample %s of %s; skipping it from now on "
                                "(%s): %s", ref.key, ref.shard, e.reason, e)
                    plan.bad[sid] = e.reason
                    found.append(sid)
        if not found:
            names = [f"{plan.refs[i].shard}:{plan.refs[i].key}"
                     for s in in_flight for i in s.record.ids if i >= 0]
            raise DataError(f"DALI pipeline failed on a batch of {names}, and every one of those "
                            f"samples decodes in Python; DALI said: {error}") from error
        restart = self.feed.pending[0].record.step - plan.first_step
        self._pipe = None
        self.rebuilds += 1
        self.feed.start(plan, restart)

    def close(self) -> None:
        self._pipe = None
        self.feed.close()
