"""`hf-gradfilter run` end to end on the embedded default, stage skipping, the report and its warnings."""

from __future__ import annotations

import html as html_lib
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
import yaml

from hf_gradfilter.cli import main

pytestmark = pytest.mark.slow  # each test runs the pipeline: `pytest -m 'not slow'` skips it

TINY_RUN = {"demo": True, "demo_rows": 80, "demo_pretrain_rows": 200, "demo_pretrain_epochs": 1, "num_members": 2,
            "lora_r": 4, "max_length": 256, "disable_tqdm": True, "use_cpu": True, "logging_steps": 1,
            "ratio": [0.25], "group_mode": "global", "target_max_steps": 2, "target_eval_steps": 2, "eval_max_rows": 8}


def statuses(out) -> dict:
    return json.loads((out / "stages.json").read_text())


def nonempty_png(path) -> bool:
    return path.exists() and path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


def test_run_writes_every_stage_skips_finished_ones_and_redoes_only_what_a_new_ratio_needs(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_GRADFILTER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**TINY_RUN, "output_dir": str(out)}))
    assert main(["run", "--config", str(config)]) == 0
    first = statuses(out)
    assert first == {"score": "ran", "select/neg_energy_token_top25pct": "ran", "select/random_top25pct": "ran",
                     "finetune/neg_energy_token_top25pct": "ran", "finetune/random_top25pct": "ran"}
    assert (out / "score" / "gradient_record.safetensors").exists() and (out / "score" / "member_1").is_dir()
    assert (out / "score" / "scored" / "dataset_info.json").exists()
    for name in ("neg_energy_token_top25pct", "random_top25pct"):
        stats = json.loads((out / "select" / name / "stats.json").read_text())
        assert stats["num_selected"] == 20 and len(np.load(out / "select" / name / "positions.npy")) == 20
        target = out / "finetune" / name
        assert (target / "adapter_model.safetensors").exists() and nonempty_png(target / "loss_curve.png")
        assert json.loads((target / "eval_metrics.json").read_text())["final_eval_loss"] > 0
    args = json.loads((out / "run_args.json").read_text())
    assert args["run"]["demo_rows"] == 80 and args["proxy"]["num_members"] == 2  # the YAML's values were used
    assert (out / "report.html").exists() and "Selection" in (out / "report.md").read_text()
    for png in ("scores.png", "drop_vs_variance.png", "proxy_loss.png", "target_loss.png", "target_eval_loss.png"):
        assert nonempty_png(out / "report" / png), png
    assert f"Report: {out}/report.html" in capsys.readouterr().out

    # the `select` verb given the same settings keeps the same rows as run's select stage (one rule: pick_rows)
    from hf_gradfilter.data.io import load_rows

    verb_out = tmp_path / "verb_selected"
    assert main(["select", "--scored", str(out / "score" / "scored"), "--ratio", "0.25",
                 "--output", str(verb_out)]) == 0
    by_verb, by_run = load_rows(str(verb_out)), load_rows(str(out / "select" / "neg_energy_token_top25pct" / "data"))
    assert len(by_run) == 20 and by_verb.to_pandas().equals(by_run.to_pandas())
    # ... and the `finetune` verb given run's target settings trains the same adapter (one stage: finetune_target)
    from safetensors.torch import load_file

    assert main(["finetune", "--dataset_name", str(verb_out), "--model_name_or_path", str(out / "target_init"),
                 "--output_dir", str(tmp_path / "verb_target"), "--max_steps", "2", "--learning_rate", "1e-2",
                 "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1", "--max_length", "256",
                 "--use_cpu", "true", "--report_to", "none"]) == 0
    by_verb = load_file(str(tmp_path / "verb_target" / "adapter_model.safetensors"))
    by_run = load_file(str(out / "finetune" / "neg_energy_token_top25pct" / "adapter_model.safetensors"))
    assert by_verb.keys() == by_run.keys() and all(torch.equal(by_verb[k], by_run[k]) for k in by_run)

    mtime = (out / "score" / "stage.json").stat().st_mtime_ns
    assert main(["run", "--config", str(config)]) == 0
    assert set(statuses(out).values()) == {"skipped"}
    assert (out / "score" / "stage.json").stat().st_mtime_ns == mtime

    assert main(["run", "--config", str(config), "--ratio", "0.5"]) == 0  # a flag overrides the file
    assert statuses(out) == {"score": "skipped", "select/neg_energy_token_top50pct": "ran",
                             "select/random_top50pct": "ran", "finetune/neg_energy_token_top50pct": "ran",
                             "finetune/random_top50pct": "ran"}
    assert json.loads((out / "select" / "neg_energy_token_top50pct" / "stats.json").read_text())["num_selected"] == 40

    # a crash inside a stage leaves it incomplete: the next run redoes that stage only
    state = out / "finetune" / "neg_energy_token_top50pct" / "stage.json"
    state.write_text(state.read_text().replace('"complete": true', '"complete": false'))
    assert main(["run", "--config", str(config), "--ratio", "0.5"]) == 0
    assert [k for k, v in statuses(out).items() if v == "ran"] == ["finetune/neg_energy_token_top50pct"]

    # `report` rebuilds the report from the files alone
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert "neg_energy_token_top50pct" in (out / "report.md").read_text()

    # publishing is one more stage: the data with every selection, and each target adapter
    from hf_gradfilter import hub

    pushed = []
    monkeypatch.setattr(hub, "push_dataset_repo", lambda repo, scored, selected, **kw: pushed.append(
        (repo, len(scored), {k: len(v) for k, v in selected.items()})) or "https://hf.co/d/commit/1")
    monkeypatch.setattr(hub, "push_adapter_repo", lambda repo, folder, **kw: pushed.append(
        (repo, os.path.basename(folder))) or "https://hf.co/m/commit/2")
    hub_flags = ["--push_dataset_id", "me/data", "--push_adapter_id", "me/target"]
    assert main(["run", "--config", str(config), "--ratio", "0.25", "0.5", *hub_flags]) == 0
    assert [k for k, v in statuses(out).items() if v == "ran"] == ["push"]
    assert pushed[0] == ("me/data", 80, {"top_25pct": 20, "top_50pct": 40})
    assert sorted(pushed[1:]) == [("me/target-top25pct", "neg_energy_token_top25pct"),
                                  ("me/target-top50pct", "neg_energy_token_top50pct")]
    assert "me/target-top25pct" in (out / "report.md").read_text()


def _record(norms, losses):
    from hf_gradfilter.proxy.record import GradientRecord

    n = norms.shape[0]
    return GradientRecord(norms.astype(np.float32), losses.astype(np.float32), np.arange(n), np.arange(n),
                          metadata={"record_mode": "train"})


def _constructed_cases():
    rng = np.random.default_rng(0)
    healthy = rng.uniform(1, 2, size=(50, 3, 2))
    healthy[:, :, 1] *= 0.5
    falling = np.stack([np.full((50, 3), 2.0), np.full((50, 3), 1.0)], axis=2)
    collapsed = healthy.copy()
    collapsed[:, :, 1] = collapsed[:, :1, 1]
    return {
        "rose": (healthy[:, :, ::-1].copy(), falling),
        "did not fall": (healthy, falling[:, :, ::-1].copy()),
        "collapsed": (collapsed, falling),
        "near zero": (np.full((50, 3, 2), 1e-9), falling),
    }


def _constructed_run(folder, norms, losses):
    """A run folder holding only a finished scoring stage, built from arrays."""
    from datasets import Dataset

    from hf_gradfilter.scores.scorers import score_dataset

    record = _record(norms, losses)
    (folder / "score").mkdir(exist_ok=True)
    record.save(str(folder / "score" / "gradient_record.safetensors"))
    n = len(norms)
    rows = Dataset.from_dict({"instruction": [f"q{i}" for i in range(n)], "output": [f"a{i}" for i in range(n)],
                              "is_corrupted": [i % 5 == 0 for i in range(n)]})
    score_dataset(rows, record).save_to_disk(str(folder / "score" / "scored"))
    (folder / "run_args.json").write_text(json.dumps({"run": {"score_column": "gsnr"},
                                                      "proxy": {"early_epoch": 1, "late_epoch": 2}}))
    return folder


@pytest.mark.parametrize("signature", list(_constructed_cases()))
def test_report_shows_each_failure_signature_of_a_constructed_run(tmp_path, signature):
    from hf_gradfilter.run.report import write_report

    _constructed_run(tmp_path, *_constructed_cases()[signature])
    paths = write_report(str(tmp_path))
    md, page = open(paths["md"]).read(), open(paths["html"]).read()
    assert signature in md.split("## Warnings")[1].split("## Scores")[0]
    assert '<div class="warn"><b>Warning:</b> ' in page and signature in page
    healthy = _constructed_cases()["did not fall"][0]
    _constructed_run(tmp_path, healthy, _constructed_cases()["rose"][1])
    assert "None of the failure signatures" in open(write_report(str(tmp_path))["md"]).read()


def test_report_of_a_folder_that_is_not_a_run_gets_a_one_line_error(tmp_path, capsys):
    assert main(["report", "--output_dir", str(tmp_path)]) == 2
    assert "not a `hf-gradfilter run` output dir" in capsys.readouterr().err


def test_run_config_file_that_is_not_a_mapping_gets_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    assert main(["run", "--config", str(bad)]) == 2
    assert "must be a YAML mapping" in capsys.readouterr().err


@pytest.mark.skipif(not shutil.which("chromium"), reason="Chromium is not installed (apt-get install chromium)")
def test_report_html_renders_in_headless_chromium(tmp_path):
    """scripts/report_screenshot.sh opens a report in headless Chromium and saves a screenshot."""
    from hf_gradfilter.run.report import write_report

    page = write_report(str(_constructed_run(tmp_path, *_constructed_cases()["rose"])))["html"]
    shot = tmp_path / "shot.png"
    subprocess.run(["bash", "scripts/report_screenshot.sh", page, str(shot)], check=True, timeout=120,
                   cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert nonempty_png(shot)
    # what a person sees: a copy of the page (beside it, so its images resolve) reports, once loaded, every
    # image that failed to decode, and the tables and headings the browser laid out
    html = open(page, encoding="utf-8").read()
    check = os.path.join(os.path.dirname(page), "browser_check.html")
    with open(check, "w", encoding="utf-8") as f:
        f.write(html.replace("</body>", BROWSER_PROBE + "</body>"))
    seen = browser_view(check, tmp_path / "profile")
    assert seen["images"] == html.count("<img") >= 2 and seen["broken"] == [], seen
    assert seen["tables"] >= 3 and seen["rows"] >= 10, seen
    assert "hf-gradfilter run report" in seen["headings"] and "Did the proxy learn?" in seen["headings"], seen
    # and the probe sees a broken image: the same page with one plot file gone
    os.remove(os.path.join(os.path.dirname(page), re.search(r'<img[^>]+src="([^"]+)"', html).group(1)))
    assert len(browser_view(check, tmp_path / "profile")["broken"]) == 1


BROWSER_PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const out = {images: imgs.length, broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src),
               tables: document.querySelectorAll('table').length, rows: document.querySelectorAll('tr').length,
               headings: [...document.querySelectorAll('h1, h2')].map(h => h.textContent)};
  const pre = document.createElement('pre'); pre.id = 'browser-check'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre); });</script>"""


def browser_view(page: str, profile) -> dict:
    """Open ``page`` in headless Chromium and return what `BROWSER_PROBE` saw once the page loaded."""
    dom = subprocess.run([shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", f"--user-data-dir={profile}",
                          "--virtual-time-budget=10000", "--dump-dom", f"file://{page}"],
                         capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'<pre id="browser-check">(.*?)</pre>', dom, re.S)
    assert found, f"the probe never ran; the browser printed: {dom[-2000:]!r}"
    return json.loads(html_lib.unescape(found.group(1)))


@pytest.mark.parametrize("name", ["run_demo.yaml", "run_alpaca_gpt2_llama2.yaml"])
def test_example_run_configs_parse_into_the_run_arguments(name):
    from hf_gradfilter.cli import _parse_run

    path = os.path.join(os.path.dirname(__file__), "..", "examples", name)
    args, config = _parse_run(["--config", path, "--seed", "3"])
    with open(path) as f:
        keys = yaml.safe_load(f)
    assert args.ratio == keys["ratio"] and config.seed == 3 and config.output_dir == keys["output_dir"]
    if keys.get("demo"):  # the demo defaults apply under the file
        assert config.learning_rate == 1e-3 and args.target_max_steps == 60
    else:
        assert config.learning_rate == keys["learning_rate"] and args.target_model == keys["target_model"]


def test_run_selection_stage_keeps_the_top_ratio_of_every_group_and_random_rows_of_the_same_groups(tmp_path):
    from datasets import Dataset

    from hf_gradfilter.run.pipeline import RunArguments, _select

    groups = ["big"] * 90 + ["mid"] * 8 + ["small"] * 2  # a dominant group
    scored = Dataset.from_dict({"gsnr": np.linspace(1, 0, 100).tolist(), "task": groups})
    scored.save_to_disk(str(tmp_path / "scored"))
    args = RunArguments(demo=True, group_column="task", group_mode="per_group", score_column="gsnr")
    for column in ("gsnr", "random"):
        _select(str(tmp_path / "scored"), str(tmp_path / f"{column}_top10pct"), column, 0.1, args, seed=0)
    kept = np.load(tmp_path / "gsnr_top10pct" / "positions.npy")
    assert kept.tolist() == list(range(9)) + [90] + [98]  # round(0.1 * n_g), at least 1, per group
    drawn = np.load(tmp_path / "random_top10pct" / "positions.npy")  # the same count from every group
    assert sorted(np.asarray(groups)[drawn].tolist()) == sorted(np.asarray(groups)[kept].tolist())
    assert drawn.tolist() != kept.tolist()


def test_run_under_torchrun_scores_fine_tunes_and_pushes_and_a_rerun_skips_all(tmp_path):
    import sys

    from launch import launch

    from hf_gradfilter import GradientRecord

    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**TINY_RUN, "output_dir": str(out), "per_device_train_batch_size": 4}))
    pushes = tmp_path / "pushes.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_GRADFILTER_CACHE": str(tmp_path / "cache"),
           "FAKE_HUB_LOG": str(pushes)}
    script = os.path.join(os.path.dirname(__file__), "scripts", "run_fake_hub.py")
    cmd = lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",  # noqa: E731
                        "--master_addr", "127.0.0.1", "--master_port", str(port), script, "--config", str(config),
                        "--push_dataset_id", "me/rows", "--push_adapter_id", "me/target"]

    stdout = launch(cmd, env).stdout
    assert set(statuses(out).values()) == {"ran"} and len(statuses(out)) == 6 and "push" in statuses(out)
    assert [json.loads(line) for line in pushes.read_text().splitlines()] == [  # once, from rank 0
        {"kind": "dataset", "repo": "me/rows", "rank": "0"}, {"kind": "adapter", "repo": "me/target", "rank": "0"}]
    assert stdout.count("[score] running") == 1  # rank 0 speaks for all
    record = GradientRecord.load(str(out / "score"))
    assert record.num_examples == 80 and np.isfinite(record.norms).all()
    last_step = json.loads((out / "score" / "log_history.json").read_text())[-1]["step"]
    assert last_step == 2 * 10  # 2 epochs of 80 rows in global batches of 2 processes x 4: both trained
    for name in ("neg_energy_token_top25pct", "random_top25pct"):
        assert json.loads((out / "finetune" / name / "eval_metrics.json").read_text())["final_eval_loss"] > 0
    assert (out / "report.html").exists()
    launch(cmd, env)
    assert set(statuses(out).values()) == {"skipped"}


def test_report_shows_the_learning_check_and_the_canary_table(tmp_path):
    from hf_gradfilter.run.report import write_report

    cases = _constructed_cases()
    _constructed_run(tmp_path, cases["did not fall"][0], cases["rose"][1])  # healthy: loss 2 -> 1
    table = {"mid_loss": {"all": 0.81, "pairs": 7, "truncated": 0.9}, "fit_rank": {"all": 0.4, "pairs": 7,
                                                                                  "truncated": 0.3}}
    (tmp_path / "score" / "canaries.json").write_text(json.dumps({"rows": 7, "share": 0.05, "table": table}))
    md = open(write_report(str(tmp_path))["md"]).read()
    learning = md.split("## Did the proxy learn?")[1].split("##")[0]
    assert "2.0000 -> 1.0000" in learning and "fell 50.0%" in learning and "| learned |" in learning
    canaries = md.split("## Canaries")[1].split("## Warnings")[0]
    assert "| mid_loss | 0.81 | 0.90 |" in canaries and "| fit_rank | 0.40 | 0.30 |" in canaries
