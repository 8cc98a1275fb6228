"""Snapshot mode (``record_mode="snapshot"``): at the end of each epoch, every example's norm, loss
and cosine for every member at the fixed end-of-epoch weights, an extra pass over the data with
no optimizer step.

Each member visits the rows in batches of similar length (`snapshot_batches`) in its own seeded
order, its reference direction starting from zero, so each cosine is against the summed gradients
of the batches the member visited before, at the same weights, whatever the number of processes.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from ..data.columns import read_int_columns
from .sampler import pad_rows


def length_order(dataset) -> np.ndarray:
    """Row positions sorted by the ``length`` column, longest first (stable); int32 below 2^31 rows (4 bytes a row)."""
    order = np.argsort(-read_int_columns(dataset, ["length"])["length"], kind="stable")
    return order.astype(np.int32) if len(order) < 2**31 else order


def snapshot_batches(by_length: np.ndarray, batch_size: int, seed: int, member: int, epoch: int) -> list[np.ndarray]:
    """The global batches (row positions) of member ``member``'s snapshot at the end of ``epoch``, in order.

    Rows sorted by length (``by_length``, `length_order`) are cut into batches of ``batch_size``
    (``per_device_eval_batch_size * world_size``), so similar lengths share a batch; their order is
    ``default_rng([seed, member, epoch, 1]).permutation``, so each member's reference direction grows
    over another sequence and is not built from the longest rows first.
    """
    batches = [by_length[i : i + batch_size] for i in range(0, len(by_length), batch_size)]
    return [batches[k] for k in np.random.default_rng([seed, member, epoch, 1]).permutation(len(batches))]


def record_snapshot(trainer, epoch: int) -> None:
    """Record every example's norm, loss and cosine for every member of ``trainer`` (a `GradFilterTrainer`)
    at its current weights (epoch is 0-based).

    Member m visits ``trainer.snapshot_batches(m, epoch)`` (process ``rank`` takes its slice of each),
    its reference direction starting from zero: each cosine is against the summed gradients of the
    batches m visited before, at the same weights, whatever the number of processes.
    """
    model = trainer.model
    was_training = model.training
    model.eval()  # no dropout: the norm at fixed weights
    unwrapped = trainer.accelerator.unwrap_model(model)
    world, rank = trainer.args.world_size, trainer.args.process_index
    directions = trainer.args.record_directions
    trainer._sketch_epoch(epoch)
    progress = tqdm(total=len(trainer.member_names) * len(trainer.train_dataset) // world,
                    desc=f"Snapshot epoch {epoch + 1}", disable=trainer.args.disable_tqdm)
    for m, name in enumerate(trainer.member_names):
        trainer._activate(name)
        trainer.recorder.reset_directions()
        params = [p for n, p in unwrapped.named_parameters() if f".{name}." in n]
        for global_batch in trainer.snapshot_batches(m, epoch):
            mine = np.array_split(global_batch, world)[rank]
            if len(mine):
                chunk = trainer.train_dataset[mine.tolist()]
                batch = trainer._prepare_inputs(pad_rows(chunk, trainer.pad_token_id))
                trainer.recorder.start(len(mine), trainer.args.device, member=name)
                losses = trainer._member_forward(model, batch)
                torch.autograd.grad(losses.sum(), params, allow_unused=True)
                sq = trainer.recorder.stop()
                trainer._store(batch["example_id"], m, epoch, sq.sqrt(), losses, trainer.recorder.cosines)
                progress.update(len(mine))
            if directions:  # every process, its slice empty or not: the all-reduce is collective
                trainer.recorder.commit(name, trainer._reduce)
    progress.close()
    trainer._activate(trainer.member_names)
    model.train(was_training)


class SnapshotCallback(TrainerCallback):
    """Runs `record_snapshot` at the end of every epoch."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_epoch_end(self, args, state, control, **kwargs):
        self.trainer.snapshot(epoch=int(round(state.epoch)) - 1)
