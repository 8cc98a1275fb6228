"""Hub publishing, offline: the folders that would be uploaded load back (datasets, PEFT, the record),
their cards parse with valid metadata, and the huggingface_hub client is only ever called through
fakes (a socket guard fails any test that tries to reach a server)."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
from datasets import Dataset, load_dataset
from huggingface_hub import DatasetCard, DatasetCardData, HfApi, ModelCard, ModelCardData
from peft import LoraConfig, PeftModel, get_peft_model

from hf_gradfilter import GradFilterConfig, GradFilterTrainer, GradientRecord, hub, select_top
from hf_gradfilter.demo.tiny import tiny_gpt2
from hf_gradfilter.scores.formulas import SCORE_COLUMNS

TOKEN = "hf_FAKEtokenForTests0123456789abcdef"
SETTINGS = {"proxy_model": "gpt2", "num_members": 5, "num_train_epochs": 2, "early_epoch": 1, "late_epoch": 2,
            "record_mode": "train", "score_column": "gsnr", "ratio": 0.1}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def fake_api(monkeypatch):
    """Replace the HfApi calls push_folder makes; record (method, token, kwargs)."""
    calls = []

    def fake(method):
        def call(self, *args, **kwargs):
            calls.append((method, self.token, args, kwargs))
            return f"https://huggingface.co/fake/commit/{method}"
        return call

    for method in ("create_repo", "create_branch", "upload_folder"):
        monkeypatch.setattr(HfApi, method, fake(method))
    return calls


@pytest.fixture(scope="module")
def scored():
    rng = np.random.default_rng(0)
    n = 40
    cols = {c: rng.normal(size=n).tolist() for c in SCORE_COLUMNS}
    cols["gsnr"][3] = math.nan  # a row with no response token
    return Dataset.from_dict({"instruction": [f"Task {i}" for i in range(n)], "input": [""] * n,
                              "output": [f"Answer {i}" for i in range(n)], **cols})


@pytest.fixture(scope="module")
def proxy_dir(tokenizer, demo_rows, tmp_path_factory):
    out = tmp_path_factory.mktemp("proxy")
    rows = demo_rows.select(range(8))
    args = GradFilterConfig(output_dir=str(out), num_members=2, per_device_train_batch_size=4, num_train_epochs=2,
                            learning_rate=5e-3, lora_r=4, lora_alpha=8, max_length=256, disable_tqdm=True,
                            seed=0, use_cpu=True, report_to="none")
    trainer = GradFilterTrainer(tiny_gpt2(tokenizer, n_embd=32, n_head=2), args=args,
                                train_dataset=rows.select_columns(["instruction", "input", "output"]),
                                processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    return out


@pytest.fixture(scope="module")
def adapter_dir(tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(tiny_gpt2(tokenizer, n_embd=32, n_head=2),
                           LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, fan_in_fan_out=True))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "log_history.json").write_text(json.dumps([{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5},
                                                      {"train_runtime": 1.0, "step": 2}]))
    (out / "training_args.bin").write_bytes(b"pickle, never uploaded")
    return out


def check_card_metadata(card, data_class):
    as_dict = card.data.to_dict()
    assert data_class(**as_dict).to_dict() == as_dict
    assert {"gradfiltering", "data-selection", "hf-gradfilter"} <= set(as_dict["tags"])
    assert "arXiv:2601.13697" in card.text and "Uncertainty-Aware Gradient Signal-to-Noise" in card.text
    return as_dict


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- builders ----------------------------------------------------------------------------------------

def test_dataset_folder_loads_back_with_its_splits_and_card(scored, tmp_path):
    top, _ = select_top(scored, "gsnr", fraction=0.1)
    folder = hub.build_dataset_repo(tmp_path / "repo", scored, {"top_10pct": top}, settings=SETTINGS,
                                    license="apache-2.0", source_dataset="tatsu-lab/alpaca", repo_id="me/alpaca-top")
    ds = load_dataset(folder, cache_dir=str(tmp_path / "cache"))
    assert set(ds) == {"scored", "top_10pct"}
    assert ds["scored"].column_names == scored.column_names == ds["top_10pct"].column_names
    assert (len(ds["scored"]), len(ds["top_10pct"])) == (40, 4)
    assert math.isnan(ds["scored"]["gsnr"][3]) and ds["top_10pct"]["gsnr"] == top["gsnr"]

    card = DatasetCard.load(tmp_path / "repo" / "README.md")
    data = check_card_metadata(card, DatasetCardData)
    assert data["license"] == "apache-2.0" and data["source_datasets"] == ["tatsu-lab/alpaca"]
    assert [f["split"] for f in data["configs"][0]["data_files"]] == ["scored", "top_10pct"]
    for text in ("Ensemble size M | 5", "(G_s - G_t) / (G_s + eps)", "| `gsnr` | 40 | 1 |", "`ens_var_late`",
                 "(gsnr_hist.png)", 'load_dataset("me/alpaca-top")', "datasets 5.", "huggingface_hub "):
        assert text in card.text, text
    assert_png(tmp_path / "repo" / "gsnr_hist.png")


def test_proxy_folder_members_load_with_peft_and_record_loads(proxy_dir, tokenizer, tmp_path):
    folder = hub.build_proxy_repo(tmp_path / "repo", proxy_dir, license="mit", datasets="tatsu-lab/alpaca")
    for m in range(2):
        model = PeftModel.from_pretrained(tiny_gpt2(tokenizer, n_embd=32, n_head=2), f"{folder}/member_{m}")
        assert any("lora_A" in n for n, _ in model.named_parameters())
    # the card's way: the repo root plus subfolder=
    model = PeftModel.from_pretrained(tiny_gpt2(tokenizer, n_embd=32, n_head=2), folder, subfolder="member_1")
    assert any("lora_A" in n for n, _ in model.named_parameters())
    record, original = GradientRecord.load(folder), GradientRecord.load(str(proxy_dir))
    np.testing.assert_array_equal(record.norms, original.norms)
    assert json.loads((tmp_path / "repo" / "gradfilter_config.json").read_text())["members"] == ["member_0", "member_1"]

    card = ModelCard.load(tmp_path / "repo" / "README.md")
    data = check_card_metadata(card, ModelCardData)
    assert data["library_name"] == "peft" and data["license"] == "mit" and data["datasets"] == ["tatsu-lab/alpaca"]
    assert "base_model" not in data  # the tiny proxy has no Hub id
    assert 'subfolder="member_0"' in card.text and "GradientRecord.load" in card.text
    assert "Ensemble size M | 2" in card.text and "| `member_1` |" in card.text
    assert_png(tmp_path / "repo" / "gsnr_hist.png")


def test_adapter_folder_loads_with_peft_and_card_names_base_model(adapter_dir, tokenizer, tmp_path):
    folder = hub.build_adapter_repo(tmp_path / "repo", adapter_dir, base_model="gpt2", datasets=["me/alpaca-top"],
                                    settings=SETTINGS, license="apache-2.0")
    model = PeftModel.from_pretrained(tiny_gpt2(tokenizer, n_embd=32, n_head=2), folder)
    assert any("lora_B" in n for n, _ in model.named_parameters())
    files = {p.name for p in (tmp_path / "repo").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "loss_curve.png"} <= files
    assert "training_args.bin" not in files
    assert_png(tmp_path / "repo" / "loss_curve.png")

    card = ModelCard.load(tmp_path / "repo" / "README.md")
    data = check_card_metadata(card, ModelCardData)
    assert data["base_model"] == "gpt2" and data["datasets"] == ["me/alpaca-top"] and data["library_name"] == "peft"
    assert "loss 3 at step 1 → 2.5 at step 2" in card.text and "(loss_curve.png)" in card.text
    assert "Selection ratio | 0.1" in card.text


def test_builders_refuse_a_folder_that_is_not_empty(scored, tmp_path):
    (tmp_path / "stale.txt").write_text("old")
    with pytest.raises(ValueError, match="not an empty folder"):
        hub.build_dataset_repo(tmp_path, scored, {"top_10pct": scored.select(range(2))}, settings=SETTINGS)


@pytest.mark.parametrize("name", ["gpt2", "meta-llama/Llama-2-7b-hf"])
def test_hub_ids_are_kept_and_local_paths_dropped(name, tmp_path):
    assert hub._hub_id(name) == name
    assert hub._hub_id(str(tmp_path)) is None and hub._hub_id("./model") is None and hub._hub_id("") is None


# ---- push_folder at the client boundary ---------------------------------------------------------

@pytest.mark.parametrize("private, revision", [(True, None), (False, "gsnr-v1")])
def test_push_folder_calls_the_client_with_repo_type_private_and_revision(
        private, revision, scored, fake_api, tmp_path, capsys, caplog):
    caplog.set_level("DEBUG")
    top, _ = select_top(scored, "gsnr", fraction=0.1)
    folder = hub.build_dataset_repo(tmp_path / "repo", scored, {"top_10pct": top}, settings=SETTINGS)
    hub.push_folder(folder, "me/alpaca-top", repo_type="dataset", private=private, revision=revision, token=TOKEN)

    methods = [c[0] for c in fake_api]
    assert methods == ["create_repo"] + (["create_branch"] if revision else []) + ["upload_folder"]
    assert all(token == TOKEN for _, token, _, _ in fake_api)
    (_, _, args, kwargs) = fake_api[0]
    assert args == ("me/alpaca-top",) and kwargs == {"repo_type": "dataset", "private": private, "exist_ok": True}
    if revision:
        assert fake_api[1][3] == {"branch": revision, "repo_type": "dataset", "exist_ok": True}
    upload = fake_api[-1][3]
    assert upload["repo_id"] == "me/alpaca-top" and upload["repo_type"] == "dataset"
    assert upload["revision"] == revision and upload["folder_path"] == folder

    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err + caplog.text
    assert all(TOKEN.encode() not in p.read_bytes() for p in (tmp_path / "repo").rglob("*") if p.is_file())


def test_push_proxy_repo_builds_then_uploads_a_model_repo(proxy_dir, fake_api, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: TOKEN)  # the stored login
    seen = []
    def upload_folder(self, *, folder_path, **kwargs):  # the temporary folder is gone after the call
        seen.append({p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*")})

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    hub.push_proxy_repo("me/proxy", proxy_dir, private=True)
    assert [c[0] for c in fake_api] == ["create_repo"] and fake_api[0][1] == TOKEN
    assert fake_api[0][3]["repo_type"] == "model" and fake_api[0][3]["private"] is True
    assert {"README.md", "member_0/adapter_model.safetensors", "member_1/adapter_config.json",
            "gradient_record.safetensors", "gradfilter_config.json"} <= seen[0]


# ---- bad input: a clear error before any client call ------------------------------------------

def test_missing_token_is_refused_before_any_call(scored, fake_api, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    folder = hub.build_dataset_repo(tmp_path / "repo", scored, {"top_10pct": scored.select(range(3))},
                                    settings=SETTINGS)
    with pytest.raises(ValueError, match="hf auth login.*HF_TOKEN"):
        hub.push_folder(folder, "me/alpaca-top", repo_type="dataset")
    with pytest.raises(ValueError, match="hf auth login"):
        hub.push_dataset_repo("me/alpaca-top", scored, {"top_10pct": scored.select(range(3))}, settings=SETTINGS)
    assert fake_api == []


@pytest.mark.parametrize("repo_id", ["alpaca-top", "me/alpaca top", "me/a/b", "me/", "/name", "me/bad--name", "me/café",
                                     ""])
def test_bad_repo_id_is_refused_before_any_call(repo_id, scored, fake_api, tmp_path):
    folder = hub.build_dataset_repo(tmp_path / "repo", scored, {"top_10pct": scored.select(range(3))},
                                    settings=SETTINGS)
    with pytest.raises(ValueError, match="namespace/name|invalid") as err:
        hub.push_folder(folder, repo_id, repo_type="dataset", token=TOKEN)
    assert repo_id in str(err.value) and TOKEN not in str(err.value)
    assert fake_api == []


def test_empty_or_badly_named_split_is_refused_before_writing_or_uploading(scored, fake_api, tmp_path):
    with pytest.raises(ValueError, match="'top_10pct' is empty"):
        hub.build_dataset_repo(tmp_path / "a", scored, {"top_10pct": scored.select([])}, settings=SETTINGS)
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="is empty"):
        hub.push_dataset_repo("me/x", scored, {"top_10pct": scored.select([])}, settings=SETTINGS, token=TOKEN)
    for bad in ("top-10pct", "top 10", "scored"):
        with pytest.raises(ValueError, match="Split name"):
            hub.build_dataset_repo(tmp_path / "b", scored, {bad: scored.select(range(2))}, settings=SETTINGS)
    assert fake_api == []


def test_other_bad_inputs_are_refused_before_any_call(scored, adapter_dir, fake_api, tmp_path):
    with pytest.raises(ValueError, match="not a PEFT adapter folder"):
        hub.build_adapter_repo(tmp_path / "a", tmp_path)
    with pytest.raises(ValueError, match="GradFilterTrainer"):
        hub.build_proxy_repo(tmp_path / "p", adapter_dir)
    with pytest.raises(ValueError, match="Score column 'ifd'"):
        hub.build_dataset_repo(tmp_path / "d", scored, {"top": scored.select(range(2))},
                               settings={**SETTINGS, "score_column": "ifd"})
    folder = hub.build_adapter_repo(tmp_path / "ok", adapter_dir)
    with pytest.raises(ValueError, match="repo_type"):
        hub.push_folder(folder, "me/x", repo_type="space", token=TOKEN)
    with pytest.raises(ValueError, match="revision='my branch'"):
        hub.push_folder(folder, "me/x", repo_type="model", revision="my branch", token=TOKEN)
    with pytest.raises(ValueError, match="no README.md"):
        hub.push_folder(tmp_path / "nothing", "me/x", repo_type="model", token=TOKEN)
    (tmp_path / "ok" / "notes.md").write_text(f"token = {TOKEN}")
    with pytest.raises(ValueError, match="notes.md contains your Hugging Face token") as err:
        hub.push_folder(folder, "me/x", repo_type="model", token=TOKEN)
    assert TOKEN not in str(err.value)
    assert fake_api == []
