"""A checkpoint's extra state: the reference directions and their epoch, the members, the partial record."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_gradfilter.proxy.checkpoint import (
    DIRECTIONS_NAME,
    load_directions,
    load_members,
    restore_record,
    save_directions,
    saved_rerecord_count,
)
from hf_gradfilter.proxy.record import GradientRecord


class Recorder:
    """Stands in for `LoraNormRecorder`'s direction state."""

    def __init__(self, value: float):
        self.state = {"member_0.0": torch.full((2, 3), value), "member_1.0": torch.full((2, 3), -value)}

    def direction_state(self):
        return self.state

    def load_direction_state(self, state):
        self.state = state


def test_directions_and_their_epoch_come_back_as_saved(tmp_path):
    path = save_directions(Recorder(2.5), 3, str(tmp_path))
    assert path.endswith(DIRECTIONS_NAME)
    restored = Recorder(0.0)
    assert load_directions(restored, str(tmp_path), "cpu") == 3
    torch.testing.assert_close(restored.state["member_0.0"], torch.full((2, 3), 2.5))
    torch.testing.assert_close(restored.state["member_1.0"], torch.full((2, 3), -2.5))


def test_a_checkpoint_without_directions_leaves_the_recorder_alone(tmp_path):
    recorder = Recorder(1.0)
    assert load_directions(recorder, str(tmp_path), "cpu") is None
    torch.testing.assert_close(recorder.state["member_0.0"], torch.ones(2, 3))


def record(n=5, hashes=None):
    return GradientRecord.empty(np.arange(n), np.arange(n) if hashes is None else hashes, 2, 2)


def test_the_partial_record_is_copied_in_place_on_rank_zero_only(tmp_path):
    saved = record()
    saved.norms[1:3] = 7.0
    saved.save(str(tmp_path))
    mine, other = record(), record()
    restore_record(mine, str(tmp_path))
    restore_record(other, str(tmp_path), into=False)  # another process: it starts empty
    np.testing.assert_array_equal(mine.norms, saved.norms)
    assert np.isnan(other.norms).all()


@pytest.mark.parametrize("other", [record(hashes=np.arange(5) + 1), record(n=6)])
def test_a_record_of_other_rows_or_settings_is_refused(other, tmp_path):
    record().save(str(tmp_path))
    with pytest.raises(ValueError, match="another dataset or settings; use a fresh output_dir"):
        restore_record(other, str(tmp_path))


def test_a_checkpoint_missing_a_member_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no adapter for member_0; .* with this num_members"):
        load_members(torch.nn.Linear(2, 2), ["member_0"], str(tmp_path))


def test_the_count_of_batches_recorded_again_is_read_from_the_checkpoints_record(tmp_path):
    saved = record()
    saved.save(str(tmp_path / "none"))
    saved.metadata["num_rerecorded_batches"] = 3
    saved.save(str(tmp_path / "three"))
    assert saved_rerecord_count(str(tmp_path / "none")) == 0 and saved_rerecord_count(str(tmp_path / "three")) == 3
