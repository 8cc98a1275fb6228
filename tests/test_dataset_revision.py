"""A Hub dataset's commit is part of `run`'s score-stage fingerprint (`run.engine.named_dataset_identity`): a dataset
changed upstream is scored again, local files keep their content hash, and offline the cached snapshot's commit (or
the one a finished stage recorded) stands in. The Hub is mocked: nothing here reaches the network."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub import constants

from hf_gradfilter.proxy.config import GradFilterConfig
from hf_gradfilter.run import engine
from hf_gradfilter.run.pipeline import RunArguments, eval_identity, make_finetune_stage, make_score_stage

SHA_A, SHA_B = "a" * 40, "b" * 40


class FakeHub:
    """`huggingface_hub.HfApi` with `dataset_info` answering ``FakeHub.sha`` (and recording what it was asked)."""

    sha = SHA_A
    asked: list = []

    def dataset_info(self, repo_id, revision=None, timeout=None):
        FakeHub.asked.append((repo_id, revision))
        return SimpleNamespace(sha=FakeHub.sha)


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    FakeHub.sha, FakeHub.asked = SHA_A, []
    return FakeHub


def fingerprint(tmp_path, **run) -> str:
    config = GradFilterConfig(output_dir=str(tmp_path / "run"), report_to="none")
    return make_score_stage(RunArguments(**run), config, str(tmp_path / "run")).fingerprint


def test_a_changed_hub_commit_changes_the_score_stage_fingerprint(tmp_path, hub):
    first = fingerprint(tmp_path, dataset_name="me/data")
    assert fingerprint(tmp_path, dataset_name="me/data") == first  # the same commit: the stage is up to date
    hub.sha = SHA_B  # a new commit upstream
    assert fingerprint(tmp_path, dataset_name="me/data") != first
    assert engine.named_dataset_identity("me/data", None, "train") == {
        "dataset": "me/data", "config": None, "split": "train", "revision": SHA_B}
    # a revision asked for is passed to the Hub and recorded beside the commit it resolved to
    assert engine.named_dataset_identity("me/data", revision="v1.0")["requested_revision"] == "v1.0"
    assert hub.asked[-1] == ("me/data", "v1.0")
    asked = len(hub.asked)
    assert engine.named_dataset_identity("me/data", revision=SHA_A)["revision"] == SHA_A  # a commit: no question
    assert len(hub.asked) == asked


def test_local_files_keep_their_content_hash_and_never_ask_the_hub(tmp_path, hub):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"instruction": "Name a drink.", "output": "tea"}) + "\n")
    first = fingerprint(tmp_path, dataset_name=str(rows))
    hub.sha = SHA_B
    assert fingerprint(tmp_path, dataset_name=str(rows)) == first and hub.asked == []
    assert set(engine.named_dataset_identity(str(rows))) == {"file_sha256"}
    rows.write_text(json.dumps({"instruction": "Name a drink.", "output": "coffee"}) + "\n")
    assert fingerprint(tmp_path, dataset_name=str(rows)) != first  # the content is what counts
    assert fingerprint(tmp_path, demo=True) == fingerprint(tmp_path, demo=True) and hub.asked == []


def test_offline_the_cached_snapshot_commit_stands_in(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "HfApi", None)  # never called offline
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "datasets--me--data"  # what `datasets` leaves after load_dataset("me/data")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA_B)
    (repo / "snapshots" / SHA_B).mkdir(parents=True)
    (repo / "snapshots" / SHA_B / "README.md").write_text("---\n---\n")
    assert engine.hub_dataset_revision("me/data") == (SHA_B, "cache")
    assert engine.named_dataset_identity("me/data")["revision"] == SHA_B


def test_an_unknown_commit_is_warned_about_and_a_finished_stage_keeps_its_own(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with caplog.at_level(logging.WARNING, logger="hf_gradfilter.run.engine"):
        identity = engine.named_dataset_identity("me/data")
    assert identity["revision"] is None and "commit of Hub dataset 'me/data' at main is unknown" in caplog.text
    assert "HF_HUB_OFFLINE is set" in caplog.text
    # the score stage finished at SHA_A: offline, the run keeps it instead of deleting it to score again
    folder = tmp_path / "score"
    stage = engine.Stage("score", str(folder), {"dataset": {**identity, "revision": SHA_A}, "model": "gpt2"})
    stage.start()
    stage.finish()
    kept = engine.keep_recorded_revision(identity, str(folder), "dataset")
    assert kept["revision"] == SHA_A and engine.Stage("score", str(folder), {"dataset": kept, "model": "gpt2"}).done()
    # ... only for the same dataset, config and split
    other = {**identity, "split": "test"}
    assert engine.keep_recorded_revision(other, str(folder), "dataset") == other


def test_a_new_commit_of_the_same_dataset_is_redone_not_refused_as_another_runs_work(tmp_path):
    inputs = {"dataset": {"dataset": "me/data", "config": None, "split": "train", "revision": SHA_A}, "model": "gpt2"}
    stage = engine.Stage("score", str(tmp_path / "score"), inputs)
    stage.start()
    stage.finish(seconds=5400)
    keys, same_run = ("dataset", "model"), ("dataset.revision",)
    newer = engine.Stage("score", stage.folder, {**inputs, "dataset": {**inputs["dataset"], "revision": SHA_B}})
    assert not newer.done() and not newer.holds_another_runs_work(keys, same_run)
    other = engine.Stage("score", stage.folder, {**inputs, "dataset": {**inputs["dataset"], "dataset": "me/other"}})
    assert other.holds_another_runs_work(keys, same_run)


def test_a_revision_of_a_local_file_is_refused(tmp_path):
    from hf_gradfilter.data.io import load_rows

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"instruction": "Name a drink.", "output": "tea"}) + "\n")
    with pytest.raises(ValueError, match="--dataset_revision v1 is for a Hub dataset"):
        load_rows(str(rows), revision="v1")


def test_the_held_out_rows_identity_is_part_of_the_fine_tune_fingerprint(tmp_path, hub):
    config = GradFilterConfig(output_dir=str(tmp_path / "run"), report_to="none")

    def fingerprint(**run) -> str:
        args = RunArguments(dataset_name="me/data", **run)
        return make_finetune_stage(args, config, str(tmp_path / "run"), "x_top10pct", "select-fp",
                                   eval_identity(args)).fingerprint

    first = fingerprint(eval_dataset_name="me/eval")
    assert fingerprint(eval_dataset_name="me/eval") == first
    hub.sha = SHA_B  # the held-out rows changed upstream: the target is fine-tuned (and evaluated) again
    assert fingerprint(eval_dataset_name="me/eval") != first
    rows = tmp_path / "eval.jsonl"
    rows.write_text(json.dumps({"instruction": "Name a drink.", "output": "tea"}) + "\n")
    local = fingerprint(eval_dataset_name=str(rows))
    rows.write_text(json.dumps({"instruction": "Name a drink.", "output": "coffee"}) + "\n")
    assert fingerprint(eval_dataset_name=str(rows)) != local
    # without held-out rows the inputs are as before the identity was added: older runs stay done
    args = RunArguments(dataset_name="me/data")
    assert set(make_finetune_stage(args, config, str(tmp_path / "run"), "x_top10pct", "select-fp",
                                   eval_identity(args)).inputs) == {"select", "target", "seed"}
