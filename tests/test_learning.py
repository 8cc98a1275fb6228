"""The learning check (`proxy.learning`): its numbers against hand-computed arrays, its verdicts, and a proxy
that cannot learn (learning rate 0) being told so, in the record and the dataset card."""

from __future__ import annotations

import numpy as np
import pytest

from hf_gradfilter import GradFilterConfig, GradFilterTrainer, GradientRecord
from hf_gradfilter.demo.tiny import tiny_gpt2
from hf_gradfilter.proxy.learning import LOSS_DROP_MIN, learning_check, summarize
from hf_gradfilter.scores.formulas import DEFAULT_SCORE


def record(norms, losses):
    n = norms.shape[0]
    return GradientRecord(np.asarray(norms, np.float32), np.asarray(losses, np.float32), np.arange(n), np.arange(n))


def test_numbers_match_hand_computed_values():
    # 2 rows, 2 members, 2 epochs
    norms = np.zeros((2, 2, 2))
    norms[0, :, 0], norms[0, :, 1] = [2.0, 2.0], [1.0, 3.0]  # G_s = 4, G_t = (1 + 9) / 2 = 5: rose
    norms[1, :, 0], norms[1, :, 1] = [2.0, 4.0], [1.0, 1.0]  # G_s = 10, G_t = 1: fell
    losses = np.zeros((2, 2, 2))
    losses[:, :, 0], losses[:, :, 1] = 2.0, 1.5
    check = learning_check(record(norms, losses))
    assert check.loss_per_epoch == pytest.approx([2.0, 1.5])
    assert check.loss_drop == pytest.approx(0.25)
    assert check.energy_fell == pytest.approx(0.5)
    # row 0: squares 1, 9 -> std 4, G_t 5 -> 0.8; row 1: squares 1, 1 -> 0; median 0.4
    assert check.member_spread == pytest.approx(0.4)
    assert check.verdict == "learned"
    assert check.warnings == []  # half the rows fell: not below the threshold


@pytest.mark.parametrize("late_loss, verdict, words", [
    (2.0, "did not learn", "did not learn"),
    (2.1, "did not learn", "did not learn"),
    (2.0 * (1 - LOSS_DROP_MIN / 2), "barely learned", "barely learned"),
    (1.0, "learned", None),
])
def test_verdict_follows_the_loss_drop_and_the_warning_names_the_fix(late_loss, verdict, words):
    rng = np.random.default_rng(0)
    norms = rng.uniform(1, 2, size=(20, 3, 2))
    norms[:, :, 1] *= 0.5
    losses = np.stack([np.full((20, 3), 2.0), np.full((20, 3), late_loss)], axis=2)
    check = learning_check(record(norms, losses), learning_rate=5e-5)
    assert check.verdict == verdict
    if words is None:
        assert check.warnings == []
    else:
        assert len(check.warnings) == 1 and words in check.warnings[0]
        assert "--learning_rate (now 5e-05)" in check.warnings[0] and "--num_train_epochs" in check.warnings[0]


def test_bad_epochs_are_refused_naming_them():
    with pytest.raises(ValueError, match="early_epoch=2, late_epoch=1"):
        learning_check(record(np.ones((3, 2, 2)), np.ones((3, 2, 2))), early_epoch=2, late_epoch=1)


def test_a_proxy_at_learning_rate_zero_is_told_it_did_not_learn(tokenizer, demo_rows, tmp_path):
    from datasets import Dataset

    from hf_gradfilter.publish.hub import selection_settings

    rows = Dataset.from_dict({k: demo_rows[k][:16] for k in ("instruction", "input", "output")})

    def run(lr, out):
        args = GradFilterConfig(output_dir=str(out), num_members=2, per_device_train_batch_size=4,
                                num_train_epochs=2, learning_rate=lr, lora_r=4, lora_alpha=8, max_length=128,
                                disable_tqdm=True, seed=0, use_cpu=True)
        trainer = GradFilterTrainer(tiny_gpt2(tokenizer, n_embd=32, n_head=2), args=args, train_dataset=rows,
                                    processing_class=tokenizer)
        trainer.train()
        trainer.save_model()
        return trainer

    frozen = run(0.0, tmp_path / "lr0")
    check = frozen.learning_check
    assert check.verdict == "did not learn" and check.loss_drop == pytest.approx(0.0, abs=1e-6)
    assert any("did not learn" in w and "--learning_rate (now 0)" in w for w in check.warnings)
    saved = GradientRecord.load(str(tmp_path / "lr0"))
    assert saved.metadata["learning_check"]["verdict"] == "did not learn"
    card_line = selection_settings(saved)["proxy_learning"]
    assert card_line.startswith("did not learn") and card_line == summarize(saved.metadata["learning_check"])

    learning = run(5e-3, tmp_path / "lr5e-3").learning_check
    assert learning.loss_drop > 0.0 and not any("did not learn" in w for w in learning.warnings)


def test_rising_energy_is_flagged_and_the_warning_points_to_a_score_without_a_drop():
    rng = np.random.default_rng(1)
    norms = rng.uniform(1, 2, size=(20, 3, 2))
    norms[:3, :, 1] = norms[:3, :, 0] * 0.5  # 3 of 20 rows fell: 15%
    norms[3:, :, 1] = norms[3:, :, 0] * 1.5
    losses = np.stack([np.full((20, 3), 2.0), np.full((20, 3), 1.0)], axis=2)  # it learned: only the energy warns
    check = learning_check(record(norms, losses))
    assert check.energy_fell == pytest.approx(0.15)
    assert check.verdict == "learned" and len(check.warnings) == 1
    assert "rose from epoch 1 to 2 for 85% of rows" in check.warnings[0]
    assert DEFAULT_SCORE in check.warnings[0]  # proxy may not import scores: the name is written out, kept true here
    norms[:, :, 1] = norms[:, :, 0] * 0.5  # every row fell: no warning
    assert learning_check(record(norms, losses)).warnings == []
