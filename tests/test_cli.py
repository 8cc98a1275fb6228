"""The hf-gradfilter CLI: score then select on a jsonl file and on the embedded default; one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from datasets import load_from_disk

from hf_gradfilter.cli import main
from hf_gradfilter.demo.data import make_demo_dataset

pytestmark = pytest.mark.slow  # each test trains through the CLI: `pytest -m 'not slow'` skips it

TINY = ["--num_members", "2", "--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--lora_r", "4",
        "--max_length", "256", "--disable_tqdm", "true", "--use_cpu", "true", "--logging_steps", "1000"]
DEMO = ["--demo_rows", "80", "--demo_pretrain_rows", "200", "--demo_pretrain_epochs", "1"]


@pytest.fixture(scope="module")
def proxy_dir(tmp_path_factory, tokenizer):
    """A tiny proxy saved to disk, as a user's local model path would be."""
    from hf_gradfilter.demo.tiny import tiny_gpt2

    path = tmp_path_factory.mktemp("proxy")
    tiny_gpt2(tokenizer, n_embd=32, n_head=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def jsonl(tmp_path):
    rows = make_demo_dataset(num_rows=40, seed=2)
    path = tmp_path / "data.jsonl"
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({"instruction": r["instruction"], "input": r["input"], "output": r["output"]}) + "\n")
    return str(path)


def test_score_then_select_on_a_jsonl_file(jsonl, proxy_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["score", "--dataset_name", jsonl, "--model_name_or_path", proxy_dir,
                 "--output_dir", str(out)] + TINY) == 0
    scored = load_from_disk(str(out / "scored"))
    assert len(scored) == 40 and {"fit_rank", "gsnr", "grad_early", "grad_late", "rel_drop",
                                  "ens_var_late"} <= set(scored.column_names)
    assert (out / "member_1" / "adapter_config.json").exists() and (out / "gradient_record.safetensors").exists()
    printed = capsys.readouterr().out
    assert "mean response loss per member and epoch" in printed
    assert "Learning check: " in printed and "gradient energy fell for" in printed  # always on
    assert main(["select", "--scored", str(out / "scored"), "--ratio", "0.25",
                 "--output", str(tmp_path / "sel.jsonl")]) == 0
    selected = [json.loads(line) for line in open(tmp_path / "sel.jsonl")]
    assert len(selected) == 10
    best = np.sort(np.asarray(scored["neg_energy_token"]))[-10:]  # the default score
    np.testing.assert_allclose(sorted(r["neg_energy_token"] for r in selected), best)


def test_demo_runs_end_to_end_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_GRADFILTER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--output_dir", str(out), "--ratio", "0.25"] + DEMO + TINY) == 0
    printed = capsys.readouterr().out
    assert "Corrupted rows in the top 25% by neg_energy_token" in printed
    assert "a random selection of 20 keeps" in printed
    selected = load_from_disk(str(out / "selected_neg_energy_token_top25pct"))
    assert len(selected) == 20 and "is_corrupted" in selected.column_names
    # the same through `score --demo` + `select`
    assert main(["score", "--demo", "--output_dir", str(tmp_path / "s")] + DEMO + TINY) == 0
    assert main(["select", "--scored", str(tmp_path / "s" / "scored"), "--top_k", "5"]) == 0
    assert len(load_from_disk(str(tmp_path / "s" / "selected_neg_energy_token_top5"))) == 5


def run_error(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    return err[-1]


def test_missing_columns_get_a_one_line_error(tmp_path, proxy_dir, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n')
    msg = run_error(["score", "--dataset_name", str(path), "--model_name_or_path", proxy_dir,
                     "--output_dir", str(tmp_path / "o")] + TINY, capsys)
    assert "Cannot tell the dataset format" in msg and "question" in msg


def test_empty_dataset_gets_a_one_line_error(tmp_path, proxy_dir, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    msg = run_error(["score", "--dataset_name", str(path), "--model_name_or_path", proxy_dir,
                     "--output_dir", str(tmp_path / "o")] + TINY, capsys)
    assert "empty" in msg.lower()


@pytest.mark.parametrize("ratio", ["0", "1.5"])
def test_ratio_outside_unit_interval_gets_a_one_line_error(tmp_path, ratio, capsys):
    from datasets import Dataset

    Dataset.from_dict({"gsnr": [1.0, 2.0]}).save_to_disk(str(tmp_path / "scored"))
    msg = run_error(["select", "--scored", str(tmp_path / "scored"), "--score_column", "gsnr", "--ratio", ratio],
                    capsys)
    assert f"ratio/fraction={float(ratio)} is outside (0, 1]" in msg


def test_late_epoch_beyond_epochs_gets_a_one_line_error(tmp_path, capsys):
    msg = run_error(["score", "--demo", "--late_epoch", "3", "--output_dir", str(tmp_path)], capsys)
    assert "late_epoch=3 is outside the 2 epoch(s) trained" in msg


def test_help_documents_the_options():
    out = subprocess.run([sys.executable, "-m", "hf_gradfilter.cli", "score", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--dataset_name", "--model_name_or_path", "--num_members", "--record_mode", "--early_epoch",
                 "--late_epoch", "--lora_r", "--max_length", "--learning_rate"):
        assert flag in out
    top = subprocess.run([sys.executable, "-m", "hf_gradfilter.cli", "--help"], capture_output=True, text=True).stdout
    assert "score" in top and "select" in top and "demo" in top


def test_finetune_command_trains_the_target_on_a_selected_split(tmp_path, tokenizer, jsonl, capsys):
    from hf_gradfilter.demo.tiny import tiny_llama

    target = tmp_path / "target"
    tiny_llama(tokenizer, hidden_size=32).save_pretrained(target)
    tokenizer.save_pretrained(target)
    out = tmp_path / "ft"
    args = ["finetune", "--dataset_name", jsonl, "--model_name_or_path", str(target), "--output_dir", str(out),
            "--max_steps", "3", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
            "--logging_steps", "1", "--max_length", "256", "--disable_tqdm", "true", "--use_cpu", "true",
            "--lora_r", "4"]
    assert main(args) == 0
    assert (out / "adapter_config.json").exists() and (out / "loss_curve.png").exists()
    assert json.load(open(out / "adapter_config.json"))["r"] == 4


def test_finetune_command_refuses_an_empty_split(tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    msg = run_error(["finetune", "--dataset_name", str(path), "--output_dir", str(tmp_path / "o")], capsys)
    assert "empty" in msg


def test_push_commands_build_the_repo_and_call_the_hub_client_only(jsonl, proxy_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from datasets import load_dataset
    from huggingface_hub import HfApi

    out = tmp_path / "out"
    assert main(["score", "--dataset_name", jsonl, "--model_name_or_path", proxy_dir,
                 "--output_dir", str(out)] + TINY) == 0
    assert main(["select", "--scored", str(out / "scored"), "--ratio", "0.25"]) == 0
    calls = []

    def fake(method):
        def call(self, *args, **kwargs):
            if method == "upload_folder":  # the folder exists only during the call: check it here
                splits = load_dataset(kwargs["folder_path"])
                kwargs["splits"] = {name: len(ds) for name, ds in splits.items()} if "data" in os.listdir(
                    kwargs["folder_path"]) else os.listdir(kwargs["folder_path"])
            calls.append((method, args, kwargs))
            return "https://huggingface.co/fake/commit"
        return call

    import os

    for method in ("create_repo", "create_branch", "upload_folder"):
        monkeypatch.setattr(HfApi, method, fake(method))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_secret_token_value")
    assert main(["push", "--what", "dataset", "--repo_id", "me/demo-gsnr", "--path", str(out), "--selected",
                 str(out / "selected_neg_energy_token_top25pct"), "--private", "true", "--revision", "v1"]) == 0
    (m1, a1, repo), (m2, a2, branch), (m3, _, upload) = calls
    assert (m1, m2, m3) == ("create_repo", "create_branch", "upload_folder")
    assert a1 == a2 == ("me/demo-gsnr",) and upload["repo_id"] == "me/demo-gsnr"
    assert repo == {"repo_type": "dataset", "private": True, "exist_ok": True}
    assert branch["branch"] == "v1" and upload["revision"] == "v1" and upload["repo_type"] == "dataset"
    assert upload["splits"] == {"scored": 40, "top_25pct": 10}
    assert "hf_secret_token_value" not in capsys.readouterr().out


def test_push_with_a_bad_repo_id_fails_before_any_client_call(tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    monkeypatch.setattr(HfApi, "create_repo", lambda *a, **k: pytest.fail("reached the client"))
    msg = run_error(["push", "--what", "proxy", "--repo_id", "no-namespace", "--path", str(tmp_path)], capsys)
    assert "no-namespace" in msg


def test_score_appends_ablations_and_requested_baselines_and_select_uses_superfiltering_for_ifd(
        jsonl, proxy_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["score", "--dataset_name", jsonl, "--model_name_or_path", proxy_dir, "--output_dir", str(out),
                 "--extra_scores", "ifd", "random", "response_length"] + TINY) == 0
    scored = load_from_disk(str(out / "scored"))
    for column in ("raw_drop", "var_drop", "neg_loss_late", "neg_grad_late", "ifd", "random", "response_length"):
        assert column in scored.column_names, column
    # the literature's columns are always added; base_loss is the frozen backbone's loss, IFD's conditioned pass
    from hf_gradfilter.scores.dynamics import DYNAMICS_COLUMNS

    assert set(DYNAMICS_COLUMNS) <= set(scored.column_names)
    np.testing.assert_allclose(scored["base_loss"], np.log(scored["ppl_conditioned"]), rtol=1e-5)
    assert np.isfinite(np.asarray(scored["reducible_loss"], dtype=float)).all()
    assert main(["select", "--scored", str(out / "scored"), "--score_column", "ifd", "--ratio", "0.25"]) == 0
    selected = load_from_disk(str(out / "selected_ifd_top25pct"))
    assert all(v < 1 for v in selected["ifd"]) and len(selected) <= 10


def test_judge_command_compares_two_targets_with_a_local_judge(tmp_path, tokenizer, capsys):
    from hf_gradfilter.demo.tiny import tiny_llama

    for name in ("a", "b", "judge"):
        tiny_llama(tokenizer, hidden_size=32, seed=len(name)).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    prompts = tmp_path / "vicuna_test_set.jsonl"
    prompts.write_text("".join(json.dumps({"question_id": i, "text": f"Say {i}.", "category": "x"}) + "\n"
                               for i in range(2)))
    out = tmp_path / "judged"
    assert main(["judge", "--target_a", str(tmp_path / "a"), "--target_b", str(tmp_path / "b"), "--prompts",
                 str(prompts), "--judge_model", str(tmp_path / "judge"), "--output_dir", str(out),
                 "--max_new_tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert "vicuna" in printed and (out / "pairwise.png").exists() and (out / "judgements.jsonl").exists()
    assert len((out / "answers_A.jsonl").read_text().splitlines()) == 2


def test_failure_signatures_are_each_triggered_by_a_constructed_record():
    from hf_gradfilter.proxy.record import GradientRecord
    from hf_gradfilter.scores.checks import failure_signatures

    def record(norms, losses):
        n = norms.shape[0]
        return GradientRecord(norms.astype(np.float32), losses.astype(np.float32), np.arange(n), np.arange(n))

    rng = np.random.default_rng(0)
    healthy = rng.uniform(1, 2, size=(50, 3, 2))
    healthy[:, :, 1] *= 0.5  # energy drops, members disagree a little
    falling = np.stack([np.full((50, 3), 2.0), np.full((50, 3), 1.0)], axis=2)
    assert failure_signatures(record(healthy, falling)) == []
    rising = healthy[:, :, ::-1].copy()
    assert any("rose" in w for w in failure_signatures(record(rising, falling)))
    assert any("did not fall" in w for w in failure_signatures(record(healthy, falling[:, :, ::-1].copy())))
    collapsed = healthy.copy()
    collapsed[:, :, 1] = collapsed[:, :1, 1]  # every member has the same late norm
    assert any("collapsed" in w for w in failure_signatures(record(collapsed, falling)))
    flat = np.full((50, 3, 2), 1e-9)
    assert any("near zero" in w for w in failure_signatures(record(flat, falling)))
