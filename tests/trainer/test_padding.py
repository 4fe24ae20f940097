"""Padding slots in a training batch (a rank's last batch of an epoch) count for nothing: not in
the loss (their masks are ignored) and not in BatchNorm's statistics either."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from dataio.loader import IGNORE_INDEX, Batch
from trainer.config import load_config
from trainer.dist import DistEnv
from trainer.trainer import Trainer

# plain SGD at a constant lr in fp32 (bf16 kernels round differently for other batch shapes): an
# update is lr x the gradient, comparable across two trainers
SGD = ["train.val_every=0", 'train.amp="off"', "data.num_threads=1", 'optim.name="sgd"',
       "optim.momentum=0.0", "optim.weight_decay=0.0", "optim.warmup_steps=0",
       'optim.schedule="constant"']


def _trainer(data: Path, run: Path, overrides: list[str]) -> Trainer:
    cfg = load_config(Path("configs/tiny.toml"), SGD + overrides)
    return Trainer(cfg, DistEnv(), data, run, device=torch.device("cpu"))


def _first_batch(t: Trainer) -> Batch:
    t.train_loader.set_epoch(0)
    batch = next(iter(t.train_loader))
    t.train_loader.close()
    assert bool(batch.valid.all()) and len(batch.keys) == 4
    return batch


def _padded(batch: Batch, real: int) -> Batch:
    """``batch`` with its slots from ``real`` on made padding, as the loader makes it."""
    n = len(batch.keys)
    image, mask = batch.image.clone(), batch.mask.clone()
    image[real:] = 0
    mask[real:] = IGNORE_INDEX
    valid = torch.arange(n) < real
    return dataclasses.replace(batch, image=image, mask=mask, valid=valid,
                               keys=batch.keys[:real] + [""] * (n - real),
                               meta=batch.meta[:real] + [{}] * (n - real))


def _state(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t.net.state_dict().items()}


def test_a_batch_with_padding_steps_as_its_real_samples_alone(small_dataset: Path,
                                                              tmp_path: Path) -> None:
    # NOTE: the zero images of padding slots went through BatchNorm in training mode: the real
    # samples of a rank's last batch were normalised with statistics of mostly zeros (their
    # loss and gradients changed), and the running statistics that validation and the epoch's
    # checkpoint use were pulled towards them once every epoch.
    padded_run = _trainer(small_dataset, tmp_path / "padded", [])  # data.batch_size = 4
    real_run = _trainer(small_dataset, tmp_path / "real", ["data.batch_size=2"])
    real_run.train_loader.close()
    batch = _first_batch(padded_run)
    real = dataclasses.replace(batch, image=batch.image[:2], mask=batch.mask[:2],
                               valid=batch.valid[:2], keys=batch.keys[:2], meta=batch.meta[:2])
    assert _state(padded_run).keys() == _state(real_run).keys()
    loss_padded = padded_run.train_step(_padded(batch, 2))
    loss_real = real_run.train_step(real)
    assert loss_padded is not None and loss_real is not None
    assert abs(loss_padded - loss_real) <= 1e-5 * abs(loss_real)
    after_padded, after_real = _state(padded_run), _state(real_run)
    for name, want in after_real.items():
        # (running_var: BatchNorm's unbiased estimate, n / (n - 1), over the pixels of 4 samples
        # against 2: ~0.1% apart in the centre block, whose 4 x 4 px per sample make n small)
        rtol = 5e-3 if name.endswith("running_var") else 1e-4
        assert torch.allclose(after_padded[name].double(), want.double(), rtol=rtol,
                              atol=1e-6), name


def test_a_batch_of_padding_only_leaves_the_weights_and_statistics_alone(
        small_dataset: Path, tmp_path: Path) -> None:
    t = _trainer(small_dataset, tmp_path / "run", [])
    batch = _padded(_first_batch(t), 0)
    before = _state(t)
    assert t.train_step(batch) == 0.0
    for name, value in _state(t).items():
        if name.endswith("num_batches_tracked"):  # (counts forwards, as on the other ranks)
            assert value == before[name] + 1, name
        else:
            assert torch.equal(value, before[name]), name
