"""Run under torchrun by test_distributed: NaN loss on rank 1 only, at its CALL-th loss, with
ACCUM loader batches per optimizer step (train.grad_accum_steps); one training run per
ACCUM:CALL given, one after another in the same process group.

NOTE: one torchrun for every case: a start of its own cost each case ~8 s of start-up on 2 cores.
Each run has a Trainer (its DDP model, loaders and metrics) and run directory of its own.

Writes rank 0's view of each run to OUT (JSON, keyed by "ACCUM:CALL"): steps taken and skipped,
the backward passes that all-reduced (counted by a DDP comm hook), and whether all ranks ended
with identical weights. Before each run rank 0 says ``nan_worker: run ACCUM:CALL`` on stderr, so
that a test can tell the runs' log lines apart. Fails if a thread of the process group outlives
dist.teardown.

    nan_worker.py DATA BASE OUT ACCUM:CALL [ACCUM:CALL ...]   (runs in BASE/run-ACCUM-CALL)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from threads import gloo_threads
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from trainer import dist
from trainer.config import load_config
from trainer.trainer import Trainer


def train(env: dist.DistEnv, data: Path, run_dir: Path, accum: int, call: int
          ) -> dict[str, object]:
    cfg = load_config(Path("configs/tiny.toml"), ["train.val_every=0", "train.epochs=2",
                                                  "data.num_threads=1",
                                                  f"train.grad_accum_steps={accum}"])
    t = Trainer(cfg, env, data, run_dir)
    real, calls = t.loss_fn, {"n": 0, "synced": 0}

    def poisoned(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = real(logits, mask)
        return loss * float("nan") if env.rank == 1 and calls["n"] == call else loss

    # NOTE: no annotations: DDP checks them against its types, and under this module's
    # "from __future__ import annotations" they are strings
    def counting(state, bucket):  # type: ignore[no-untyped-def]
        if bucket.index() == 0:  # (once per backward that all-reduces, whatever the buckets)
            calls["synced"] += 1
        return allreduce_hook(None, bucket)

    t.loss_fn = poisoned
    t.model.register_comm_hook(None, counting)
    t.train()
    flat = torch.cat([p.detach().flatten() for p in t.net.parameters()])
    views = dist.gather_objects(flat)
    skipped = t.metrics.skipped_steps.labels(reason="nonfinite_loss")._value.get()
    return {
        "identical": all(torch.equal(views[0], v) for v in views[1:]),
        "global_step": t.global_step, "skipped": skipped,
        "optimizer_steps_per_epoch": t.optimizer_steps_per_epoch,
        "synced_backwards": calls["synced"],
        "steps_taken": int(t.optimizer.state_dict()["state"][0]["step"]),
    }


def main(data: Path, base: Path, out: Path, cases: list[str]) -> None:
    env = dist.init(dist.DistEnv.from_env())
    views = {}
    try:
        for case in cases:
            accum, call = map(int, case.split(":"))
            if env.is_main:  # (one write: print's two could have rank 1's output between)
                sys.stderr.write(f"nan_worker: run {case}\n")
                sys.stderr.flush()
            # NOTE: in a function of its own, so that the Trainer (its DDP model) is gone before
            # the teardown, as in trainer.train. A DDP model that outlives
            # destroy_process_group destroys the group later, from its reducer, joining the gloo
            # threads with the GIL held: a thread that needs the GIL then (to drop a tensor of a
            # collective it finished late) hangs the process.
            views[case] = train(env, data, base / f"run-{accum}-{call}", accum, call)
    finally:
        dist.teardown()
    if left := gloo_threads():
        sys.exit(f"rank {env.rank}: the process group's threads outlived dist.teardown: {left}")
    if env.is_main:
        out.write_text(json.dumps(views))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
