"""Scoring under torchrun or accelerate launch (2 CPU processes, gloo) equals 1 process; a SIGKILLed
run resumes to the same record."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from launch import launch

from hf_gradfilter import GradientRecord, score_parts, top_indices

pytestmark = pytest.mark.slow  # torchrun and resumed CLI runs: `pytest -m 'not slow'` skips it

SCRIPT = str(Path(__file__).parent / "scripts" / "score_tiny.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def score(out, *extra, processes=1, launcher="torchrun"):
    args = ["--output_dir", str(out), *extra]
    if processes == 1:
        subprocess.run([sys.executable, SCRIPT, *args], check=True, env=ENV, timeout=600,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elif launcher == "torchrun":
        launch(lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                             "--master_addr", "127.0.0.1", "--master_port", str(port), SCRIPT, *args], ENV)
    else:  # `--multi_gpu` picks accelerate's torch.distributed launcher; with no GPU the processes use gloo on CPU
        launch(lambda port: [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                             str(processes), "--num_machines", "1", "--main_process_port", str(port),
                             "--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT, *args], ENV)
    return GradientRecord.load(str(out))


@pytest.mark.parametrize("mode, launcher", [("train", "torchrun"), ("snapshot", "torchrun"), ("train", "accelerate")])
def test_two_processes_give_the_single_process_record_and_selection(mode, launcher, tmp_path):
    single = score(tmp_path / "one", "--batch", "4", "--record_mode", mode)
    # 20 values per all-reduce = 5 rows of 2 members x 2 epochs: the merge runs in 8 blocks of rows
    double = score(tmp_path / "two", "--batch", "2", "--record_mode", mode, "--gather_chunk", "20", processes=2,
                   launcher=launcher)
    assert np.isfinite(double.norms).all()  # every example, member and epoch recorded (exactly once: else it raises)
    np.testing.assert_allclose(double.norms, single.norms, rtol=1e-4)
    np.testing.assert_allclose(double.losses, single.losses, rtol=1e-4)
    np.testing.assert_array_equal(np.isnan(double.cosines), np.isnan(single.cosines))  # against the global reference
    np.testing.assert_allclose(double.cosines, single.cosines, rtol=1e-4, atol=1e-6)
    a, _ = top_indices(score_parts(single.norms)["gsnr"], fraction=0.3)
    b, _ = top_indices(score_parts(double.norms)["gsnr"], fraction=0.3)
    assert a.tolist() == b.tolist()


def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_record(tmp_path):
    reference = score(tmp_path / "ref", "--save_steps", "3")
    out = tmp_path / "killed"
    cmd = [sys.executable, SCRIPT, "--output_dir", str(out), "--save_steps", "3", "--sleep", "0.3"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint-6" / "trainer_state.json").exists():  # step 6 of 10 in epoch 1
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "gradient_record.safetensors").exists()  # it really died before the end
    resumed = score(out, "--save_steps", "3")  # the same command again
    assert (out / "steps_run.txt").read_text() == "14"  # 2 epochs x 10 steps, 6 done before the kill
    assert (tmp_path / "ref" / "steps_run.txt").read_text() == "20"
    np.testing.assert_allclose(resumed.norms, reference.norms, rtol=1e-6)
    np.testing.assert_allclose(resumed.losses, reference.losses, rtol=1e-6)
    np.testing.assert_allclose(resumed.cosines, reference.cosines, rtol=1e-6, atol=1e-7)


def test_cli_score_under_torchrun_writes_the_single_process_record_and_scores(tokenizer, demo_rows, tmp_path):
    from datasets import load_from_disk

    from hf_gradfilter.demo.tiny import tiny_gpt2

    model = tmp_path / "model"
    tiny_gpt2(tokenizer, n_embd=32, n_head=2).save_pretrained(model)
    tokenizer.save_pretrained(model)
    demo_rows.select(range(37)).select_columns(["instruction", "input", "output"]).to_json(tmp_path / "rows.jsonl")
    common = ["score", "--dataset_name", str(tmp_path / "rows.jsonl"), "--model_name_or_path", str(model),
              "--num_members", "2", "--num_train_epochs", "2", "--lora_r", "4", "--lora_alpha", "8",
              "--learning_rate", "5e-3", "--use_cpu", "true", "--seed", "3", "--max_length", "256"]
    subprocess.run([sys.executable, "-m", "hf_gradfilter.cli", *common, "--output_dir", str(tmp_path / "1"),
                    "--per_device_train_batch_size", "4"], check=True, env=ENV, timeout=600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    launch(lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                         "127.0.0.1", "--master_port", str(port), "-m", "hf_gradfilter.cli", *common, "--output_dir",
                         str(tmp_path / "2"), "--per_device_train_batch_size", "2"], ENV)  # the same global batch
    one, two = (GradientRecord.load(str(tmp_path / str(p))) for p in (1, 2))
    assert np.isfinite(two.norms).all()
    np.testing.assert_allclose(two.norms, one.norms, rtol=1e-4)
    scored = [load_from_disk(str(tmp_path / str(p) / "scored")) for p in (1, 2)]
    assert len(scored[1]) == 37
    for column in ("neg_energy_token", "fit_rank", "gsnr"):
        np.testing.assert_allclose(np.array(scored[1][column], dtype=float), np.array(scored[0][column], dtype=float),
                                   rtol=1e-4)
