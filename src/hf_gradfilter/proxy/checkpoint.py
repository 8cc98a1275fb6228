"""What a `GradFilterTrainer` checkpoint holds besides the Trainer's own state (optimizer, scheduler,
RNG, step): every member's adapter (``member_m/``), the partial record, and the members' reference
directions of the epoch in progress (`DIRECTIONS_NAME`), so a run resumed mid-epoch records what an
uninterrupted run would, and the count of batches recorded again in float32 so far (in the record's
metadata)."""

from __future__ import annotations

import json
import os

import numpy as np

from .record import read_record_arrays, read_record_metadata

DIRECTIONS_NAME = "gradfilter_directions.safetensors"  # checkpoints: the reference directions in progress


def save_directions(recorder, epoch: int | None, output_dir: str) -> str:
    """Write ``recorder``'s reference directions (`LoraNormRecorder.direction_state`) and the epoch they
    belong to as `DIRECTIONS_NAME` in ``output_dir``."""
    from safetensors.torch import save_file

    path = os.path.join(output_dir, DIRECTIONS_NAME)
    state = {k: v.detach().cpu().contiguous() for k, v in recorder.direction_state().items()}
    save_file(state, path, metadata={"epoch": json.dumps(epoch)})
    return path


def load_directions(recorder, checkpoint: str, device) -> int | None:
    """Restore the reference directions saved in ``checkpoint`` into ``recorder`` (on every process: the
    references are the global ones). Returns the epoch they belong to, or None if none were saved."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = os.path.join(checkpoint, DIRECTIONS_NAME)
    if not os.path.exists(path):
        return None
    recorder.load_direction_state(load_file(path, device=str(device)))
    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata()["epoch"])


def load_members(model, member_names: list[str], checkpoint: str) -> None:
    """Load every member's adapter weights from ``checkpoint/<member>/adapter_model.safetensors``."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    for name in member_names:
        path = os.path.join(checkpoint, name, "adapter_model.safetensors")
        if not os.path.exists(path):
            raise FileNotFoundError(f"Checkpoint {checkpoint} has no adapter for {name}; "
                                    "it was not written by GradFilterTrainer with this num_members.")
        set_peft_model_state_dict(model, load_file(path), adapter_name=name)


def restore_record(record, checkpoint: str, into: bool = True) -> None:
    """Check that the record saved in ``checkpoint`` belongs to ``record``'s rows and shape, and (``into``)
    copy its values into ``record`` in place.

    One array at a time, mapped from the checkpoint (no second record in memory); a checkpoint
    without cosines (older versions) leaves them NaN. Under several processes only rank 0 copies
    (``into``): the others start empty, so the next merge counts each row once.
    """
    names = ["row_hash", "norms", "losses", "cosines"] + (["sketches"] if record.sketches is not None else [])
    for name, array in read_record_arrays(checkpoint, names):
        if ((name == "row_hash" and not np.array_equal(array, record.row_hash))
                or (name in ("norms", "sketches") and array.shape != getattr(record, name).shape)):
            raise ValueError(f"The record in {checkpoint} was made from another dataset or "
                             "settings; use a fresh output_dir.")
        if name != "row_hash" and into:
            getattr(record, name)[:] = array


def saved_rerecord_count(checkpoint: str) -> int:
    """How many member batches were recorded again in float32 (`rerecord`) before ``checkpoint`` was saved,
    over all processes (the record's ``num_rerecorded_batches`` metadata; 0 when none was)."""
    return int(read_record_metadata(checkpoint).get("num_rerecorded_batches", 0))
