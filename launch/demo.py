"""The one-command demo: synthetic AOI -> shards -> torchrun training -> tuned polygons -> F1.

    python -m launch.demo --out demo [--tiles 300] [--seed 0] [--nproc N] [--fresh]
                          [--set section.key=value ...] [--product MUL-PanSharpen]

Every stage is the command a user runs on real SpaceNet data (printed before it runs), so the demo
doubles as a worked example. Stages already completed with the same arguments are skipped on a
rerun (training resumes from its checkpoints anyway); ``--fresh`` starts over. The run directory
is ``OUT/run``; the report (``summary.json``, ``README.md``, pictures) is ``OUT/run/report``.
Training takes ``--nproc`` processes (default 2; on a one-GPU machine 1), one per GPU with NCCL.
``--product MUL-PanSharpen`` runs it on 8-band imagery (synth ``--mul``, prepare ``--product``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dataio.atomic import atomic_write_text, check_writable
from dataio.prepare import DEFAULT_SPLIT, split_counts
from dataio.spacenet import DEFAULT_PRODUCT, PRODUCTS
from launch.report import write_report
from postproc.pools import ignore_further_sigint, run_to_end, say, sigint_once
from trainer.config import ConfigError, load_config
from trainer.dist import check_one_gpu_each

PY = sys.executable
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone"]


@dataclass
class Demo:
    out: Path
    tiles: int = 300
    seed: int = 0
    nproc: int = 2
    config: Path = Path("configs/demo.toml")
    overrides: list[str] = field(default_factory=list)
    render_tiles: int = 4
    product: str = DEFAULT_PRODUCT  # the imagery trained on (prepare --product)

    @property
    def raw(self) -> Path:
        return self.out / "raw" / "AOI_2_Vegas_Train"

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def run(self) -> Path:
        return self.out / "run"

    @property
    def report(self) -> Path:
        return self.run / "report"

    def stages(self) -> list[tuple[str, list[str]]]:
        """(name, command) in order; paths relative to the repository root."""
        workers = str(min(2, len(os.sched_getaffinity(0))))
        sets = [a for o in self.overrides for a in ("--set", o)]
        proposals = self.report / "proposals_test.csv"
        # NOTE: no flag for the default product: the commands, and so a demo directory's
        # completed stages (stages.json), stay what they were
        mul = [] if self.product == DEFAULT_PRODUCT else ["--mul"]
        product = [] if self.product == DEFAULT_PRODUCT else ["--product", self.product]
        return [
            ("synth", [PY, "-m", "dataio.synth", "--out", str(self.raw), "--tiles",
                       str(self.tiles), "--seed", str(self.seed), "--workers", workers,
                       "--overwrite", *mul]),
            ("prepare", [PY, "-m", "dataio.prepare", "--raw", str(self.raw), "--out",
                         str(self.data), "--seed", str(self.seed), "--workers", workers,
                         "--overwrite", *product]),
            ("train", [*TORCHRUN, f"--nproc_per_node={self.nproc}", "-m", "trainer.train",
                       "--config", str(self.config), "--data", str(self.data), "--run-dir",
                       str(self.run), *sets]),
            *[(f"predict_{s}", [*TORCHRUN, f"--nproc_per_node={self.nproc}", "-m",
                                "trainer.predict", "--run-dir", str(self.run), "--data",
                                str(self.data), "--split", s, "--out", str(self.out / "pred" / s)])
              for s in ("val", "test")],
            ("tune", [PY, "-m", "postproc.tune", "--pred", str(self.out / "pred" / "val"),
                      "--truth", str(self.data / "val" / "truth.csv"), "--run-dir",
                      str(self.run), "--workers", workers]),
            ("polygonize", [PY, "-m", "postproc.polygonize", "--pred",
                            str(self.out / "pred" / "test"), "--out", str(proposals),
                            "--geojson", str(self.report / "geojson"), "--workers", workers]),
            ("score", [PY, "-m", "postproc.score", "--truth", str(self.data / "test" /
                                                                  "truth.csv"),
                       "--proposals", str(proposals), "--json",
                       str(self.report / "score_test.json")]),
            ("render", [PY, "-m", "postproc.render", "--pred", str(self.out / "pred" / "test"),
                        "--data", str(self.data), "--split", "test", "--proposals",
                        str(proposals), "--out", str(self.report / "tiles"), "--tiles",
                        str(self.render_tiles)]),
            ("curves", [PY, "-m", "postproc.render", "--curves", str(self.run / "log.jsonl"),
                        "--out", str(self.report / "curves.png")]),
        ]

    def outputs(self, name: str) -> list[Path]:
        """What a stage writes that its command does not replace by itself (synth and prepare
        replace theirs with --overwrite): cleared before the stage runs again on changed inputs,
        since a run directory trained on other data would be resumed, not retrained."""
        return {"train": [self.run]}.get(name, [])

    def results(self, name: str) -> list[Path]:
        """What a completed stage left for the stages after it and the report: a stage whose
        results are gone is run again, and every stage after it (see :func:`first_to_run`).
        (Not "products": ``product`` is the imagery, ``--product``.)

        NOTE: synth's raw AOI matters only when prepare runs again (nothing else reads it)."""
        report, pred = self.report, self.out / "pred"
        return {"synth": [self.raw], "prepare": [self.data / "manifest.json"],
                "train": [self.run], "predict_val": [pred / "val"],
                "predict_test": [pred / "test"],
                "tune": [self.run / "postproc.json", self.run / "tune.json"],
                "polygonize": [report / "proposals_test.csv"],
                "score": [report / "score_test.json"], "render": [report / "tiles"],
                "curves": [report / "curves.png"]}.get(name, [])


def _env() -> dict[str, str]:
    # NOTE: one thread per process: the demo runs as many processes as there are cores.
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path.cwd()),
                                                        os.environ.get("PYTHONPATH")])))
    if not sys.stderr.isatty():  # a log file, not a terminal: progress bars every 30 s only
        env.setdefault("TQDM_MININTERVAL", "30")
    return env


def read_state(path: Path) -> dict[str, dict]:
    """``OUT/stages.json``: per stage, its command and, once it completed, its seconds."""
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable demo state ({e}); delete it or pass --fresh"
                         ) from None
    if not isinstance(state, dict) or not all(isinstance(v, dict) and "cmd" in v
                                              for v in state.values()):
        raise ValueError(f"{path}: not a demo state (an object of stages, each with its cmd); "
                         "delete it or pass --fresh")
    return state


def run_stage(cmd: list[str]) -> int:
    """Run a stage's command to its end; its exit code. On Ctrl-C the stage stops by itself
    (it got the Ctrl-C too) and is waited for (``postproc.pools.run_to_end``), then
    KeyboardInterrupt."""
    return run_to_end(cmd, env=_env()).returncode


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that holds something but is no demo's directory (no stages.json).

    NOTE: the demo replaces what it finds at its paths (synth and prepare run with --overwrite,
    --fresh deletes OUT): ``--out .`` in the directory of the README's own commands replaced
    the user's raw/AOI_2_Vegas_Train and data/ (or, with --fresh, deleted the directory)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory for the demo")
    if out.is_dir() and not (out / "stages.json").is_file() and any(out.iterdir()):
        raise ValueError(f"--out {out} holds files but no stages.json: it is no demo's "
                         "directory, and the demo would replace or delete what is there; give a "
                         "new or empty directory")
    # NOTE: one this user cannot write failed after the checks, with exit code 1 and
    # "[Errno 13] Permission denied" naming OUT or a temporary file of stages.json
    check_writable(out / "stages.json", "--out", given=out)


def first_to_run(demo: Demo, stages: list[tuple[str, list[str]]], done: dict[str, dict]
                 ) -> int:
    """Index of the first stage to run: the first not completed with the same command, or whose
    results are gone (synth's only when prepare runs); the stages before it are skipped.

    NOTE: the state alone was trusted: a rerun after ``rm -r OUT/run/report`` (to redo the
    report) skipped every stage and failed on "score_test.json is missing: the stage that writes
    it did not run"; only --fresh, retraining, went on. Every stage's results count but the
    first stage's (synth's raw AOI) is read only by the second, prepare: it is made again only
    when prepare runs."""
    def gone(i: int) -> bool:
        return any(not p.exists() for p in demo.results(stages[i][0]))

    first = next((i for i, (name, cmd) in enumerate(stages)
                  if done.get(name, {}).get("cmd") != cmd or "seconds" not in done[name]
                  or (i > 0 and gone(i))), len(stages))
    # (the stages between the first and this one left all they made, by the test above)
    return 0 if first == 1 and gone(0) else first


def run_demo(demo: Demo, fresh: bool = False) -> dict:
    """Run (or resume) every stage; returns the summary that the report holds."""
    check_out(demo.out)
    if fresh and demo.out.exists():
        shutil.rmtree(demo.out)
    demo.out.mkdir(parents=True, exist_ok=True)
    state_path = demo.out / "stages.json"
    done = read_state(state_path)
    seconds: dict[str, float] = {}
    upstream_ran = False
    stages = demo.stages()
    names = [n for n, _ in stages]
    first = first_to_run(demo, stages, done)
    for i, (name, cmd) in enumerate(stages):
        last = done.get(name, {})
        if i < first:
            print(f"== {name}: done before, skipped", flush=True)
            seconds[name] = last["seconds"]
            continue
        # A stage that was interrupted with the same arguments (its record says started)
        # resumes, training from its checkpoints; any other starts from nothing: its inputs or
        # arguments changed, or an upstream rerun dropped its record (also when that rerun was
        # stopped while these very outputs were being removed).
        gone = [str(p) for p in demo.results(name) if not p.exists()]
        if not upstream_ran and last.get("cmd") == cmd and "seconds" in last and gone:
            print(f"== {name}: done before, but {gone[0]} is gone: running it again", flush=True)
        if upstream_ran or last.get("cmd") != cmd:
            for path in demo.outputs(name):
                if path.exists():
                    print(f"== {name}: inputs changed, removing {path}", flush=True)
                    shutil.rmtree(path)
        upstream_ran = True
        # NOTE: recorded as started (no seconds) before it runs, and what follows it dropped: a
        # stage killed or failed is never "done before", whatever the state held for it.
        done[name] = {"cmd": cmd}
        for later in names[names.index(name) + 1:]:
            done.pop(later, None)
        atomic_write_text(state_path, json.dumps(done, indent=1) + "\n")
        print(f"== {name}: {shlex.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        returncode = run_stage(cmd)
        if returncode != 0:
            raise RuntimeError(f"stage {name} failed (exit {returncode}): {shlex.join(cmd)}")
        seconds[name] = round(time.perf_counter() - t0, 1)
        done[name]["seconds"] = seconds[name]
        atomic_write_text(state_path, json.dumps(done, indent=1) + "\n")
    return write_report(demo.run, demo.data, seconds)


def training_procs(requested: int | None) -> int:
    """``requested``, else 2 processes (the recipe of configs/demo.toml: a global batch of 16),
    each on a GPU of its own where CUDA is present (NCCL): fewer on a one-GPU machine."""
    if not torch.cuda.is_available():
        return requested or 2
    if requested is None:
        return min(2, torch.cuda.device_count())
    check_one_gpu_each(requested, "--nproc ")  # (the hint names the demo's own option)
    return requested


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("demo"),
                   help="directory for everything the demo writes (default %(default)s)")
    p.add_argument("--tiles", type=int, default=300,
                   help="tiles of the synthetic AOI (default %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of synth and prepare (default %(default)s)")
    p.add_argument("--nproc", type=int, default=None,
                   help="training processes (torchrun; default 2, at most one per GPU)")
    p.add_argument("--config", type=Path, default=Path("configs/demo.toml"),
                   help="training preset (default %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override a training config value")
    p.add_argument("--render-tiles", type=int, default=4,
                   help="test tiles drawn in the report (default %(default)s)")
    p.add_argument("--product", choices=list(PRODUCTS), default=DEFAULT_PRODUCT,
                   help="the imagery trained on: RGB-PanSharpen (default) or MUL-PanSharpen (8 "
                   "bands: synth --mul, prepare --product; 2.7x the disk)")
    p.add_argument("--fresh", action="store_true", help="delete OUT and start over")
    args = p.parse_args(argv)
    # NOTE: everything the later stages would refuse is checked here, before minutes of synth
    # and prepare.
    for flag, value in (("--tiles", args.tiles), ("--nproc", args.nproc),
                        ("--render-tiles", args.render_tiles)):
        if value is not None and value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    try:
        args.nproc = training_procs(args.nproc)
    except ValueError as e:
        p.error(f"--nproc: {e}")
    # every split must get a tile (prepare's default 70:15:15), else predict or tune fails late
    split = DEFAULT_SPLIT
    if 0 in split_counts(args.tiles, split):
        least = next(n for n in range(1, 1000) if 0 not in split_counts(n, split))
        p.error(f"--tiles {args.tiles} leaves a split empty at {':'.join(f'{w:g}' for w in split)}"
                f" (train:val:test); give at least {least}")
    try:
        load_config(args.config, args.overrides)
        check_out(args.out)
    except (ConfigError, ValueError) as e:
        p.error(str(e))
    demo = Demo(out=args.out, tiles=args.tiles, seed=args.seed, nproc=args.nproc,
                config=args.config, overrides=args.overrides, render_tiles=args.render_tiles,
                product=args.product)
    try:
        with sigint_once():  # (a second press cannot cut the wait for the stage short)
            run_demo(demo, fresh=args.fresh)
    except (RuntimeError, OSError, ValueError) as e:
        print(f"launch.demo: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        ignore_further_sigint()
        say(f"launch.demo: interrupted; rerun the same command to go on (the stages done in "
            f"{demo.out / 'stages.json'} are skipped)")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
