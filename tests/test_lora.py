"""One LoRA settings dataclass: the target's fields, run's ``--target_`` copies and the proxy's members all go
through `LoraArguments`."""

import dataclasses

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_gradfilter import GradFilterConfig, LoraArguments, build_ensemble
from hf_gradfilter.finetuning.finetune import FinetuneArguments
from hf_gradfilter.run.pipeline import RunArguments


def test_the_finetune_verb_and_run_share_the_fields_defaults_and_help():
    lora = {f.name: f for f in dataclasses.fields(LoraArguments)}
    verb = {f.name: f for f in dataclasses.fields(FinetuneArguments)}
    run = {f.name: f for f in dataclasses.fields(RunArguments)}
    for name, f in lora.items():
        assert verb[name].metadata == f.metadata
        assert run[f"target_{name}"].metadata == f.metadata
    defaults = LoraArguments()
    assert LoraArguments.from_fields(RunArguments(), prefix="target_") == defaults
    assert LoraArguments.from_fields(FinetuneArguments()) == defaults


def test_from_fields_reads_the_prefixed_values_and_to_peft_config_maps_all_linear():
    run = RunArguments(target_lora_r=4, target_lora_alpha=8, target_lora_dropout=0.0,
                       target_lora_target_modules=["q_proj"])
    lora = LoraArguments.from_fields(run, prefix="target_")
    assert (lora.lora_r, lora.lora_alpha, lora.lora_dropout, lora.lora_target_modules) == (4, 8, 0.0, ["q_proj"])
    peft = lora.to_peft_config()
    assert (peft.r, peft.lora_alpha, peft.task_type) == (4, 8, "CAUSAL_LM")
    assert peft.target_modules == {"q_proj"}
    assert LoraArguments().to_peft_config().target_modules == "all-linear"  # PEFT's keyword, not a module name


@pytest.mark.parametrize("targets", [None, ["c_attn", "c_proj"]])
def test_the_proxy_members_get_the_configs_lora_fields(tmp_path, targets):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32))
    args = GradFilterConfig(output_dir=str(tmp_path), num_members=2, lora_r=2, lora_alpha=6,
                            lora_target_modules=targets, use_cpu=True)
    ensemble = build_ensemble(model, args)
    for name, config in ensemble.peft_config.items():
        assert (config.r, config.lora_alpha, config.lora_dropout) == (2, 6, 0.0), name
        assert config.fan_in_fan_out  # GPT-2's Conv1D
        assert config.target_modules == ({"c_attn"} if targets is None else set(targets))
