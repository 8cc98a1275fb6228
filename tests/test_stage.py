"""`run`'s stage engine (`run.engine.Stage`): what a rerun may replace and what it must refuse."""

from __future__ import annotations

from hf_gradfilter.run.engine import Stage

INPUTS = {"dataset": {"path": "a.jsonl", "sha256": "1"}, "model": "gpt2", "proxy": {"learning_rate": 5e-5, "seed": 0}}


def finished(tmp_path, inputs=INPUTS, complete=True) -> Stage:
    stage = Stage("score", str(tmp_path / "score"), inputs)
    stage.start()
    if complete:
        stage.finish(seconds=5400)
    return stage


def other(tmp_path, **changes) -> Stage:
    return Stage("score", str(tmp_path / "score"), {**INPUTS, **changes})


def test_changed_inputs_are_named_one_level_into_dicts(tmp_path):
    finished(tmp_path)
    stage = other(tmp_path, proxy={"learning_rate": 2e-4, "seed": 0}, model="smollm2")
    assert stage.changed_inputs() == ["model", "proxy.learning_rate"]


def test_another_dataset_or_model_is_another_runs_work_a_proxy_setting_is_not(tmp_path):
    finished(tmp_path)
    keys = ("dataset", "model")
    assert other(tmp_path, dataset={"path": "b.jsonl", "sha256": "2"}).holds_another_runs_work(keys)
    assert other(tmp_path, model="smollm2").holds_another_runs_work(keys)
    assert not other(tmp_path, proxy={"learning_rate": 2e-4, "seed": 0}).holds_another_runs_work(keys)
    assert not other(tmp_path).holds_another_runs_work(keys)  # the same run: skipped, not refused


def test_an_unfinished_stage_counts_only_with_a_checkpoint_to_resume(tmp_path):
    stage = finished(tmp_path, complete=False)
    changed = other(tmp_path, model="smollm2")
    assert not changed.holds_another_runs_work(("model",))
    (tmp_path / "score" / "checkpoint-40").mkdir()
    assert stage.folder == changed.folder and changed.holds_another_runs_work(("model",))


def test_the_score_fingerprint_ignores_tracking_and_eval_fields_and_keeps_training_ones(tmp_path):
    from hf_gradfilter import GradFilterConfig
    from hf_gradfilter.run.pipeline import proxy_inputs

    base = dict(output_dir=str(tmp_path), use_cpu=True)
    same = proxy_inputs(GradFilterConfig(**base))
    assert proxy_inputs(GradFilterConfig(**base, per_device_eval_batch_size=64, trackio_space_id="me/space",
                                         logging_steps=3, project="other", skip_memory_metrics=False)) == same
    for change in ({"learning_rate": 1e-3}, {"seed": 7}, {"per_device_train_batch_size": 2}, {"lora_r": 4},
                   {"warmup_steps": 5}):
        assert proxy_inputs(GradFilterConfig(**base, **change)) != same, change


def test_run_checks_the_target_model_only_while_a_fine_tune_stage_is_left(tmp_path, monkeypatch):
    """`run --target_model` is refused at the door (before scoring) when it cannot be loaded, but a rerun whose
    fine-tune stages are all done never loads it: it is not checked then (the stages' work is faked here)."""
    import json

    from hf_gradfilter import GradFilterConfig
    from hf_gradfilter.run import pipeline, report

    checked = []
    monkeypatch.setattr(pipeline, "check_causal_lm", lambda name, flag, **kw: checked.append((name, flag)))
    monkeypatch.setattr(pipeline, "_score", lambda args, config, folder: {})
    monkeypatch.setattr(pipeline, "_select", lambda *a: {})

    def finetune(args, config, selected, folder, out):
        with open(f"{folder}/eval_metrics.json", "w") as f:
            json.dump({"train_rows": 1}, f)
        return {}

    monkeypatch.setattr(pipeline, "_finetune", finetune)
    monkeypatch.setattr(report, "write_report", lambda out: {"html": "r.html", "md": "r.md"})
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"instruction": "a", "output": "b"}\n')
    args = pipeline.RunArguments(dataset_name=str(rows), target_model="./gone", ratio=[0.25])
    config = GradFilterConfig(output_dir=str(tmp_path / "run"), use_cpu=True)

    assert set(pipeline.run(args, config).values()) == {"ran"}
    assert checked == [("./gone", "--target_model")]
    assert set(pipeline.run(args, config).values()) == {"skipped"}
    assert len(checked) == 1  # every fine-tune stage was done: the target was not needed, nor checked
    state = tmp_path / "run" / "finetune" / "neg_energy_token_top25pct" / "stage.json"
    state.write_text(state.read_text().replace('"complete": true', '"complete": false'))
    assert [k for k, v in pipeline.run(args, config).items() if v == "ran"] == ["finetune/neg_energy_token_top25pct"]
    assert len(checked) == 2  # a fine-tune stage to redo: checked again, before anything ran
