"""The proxy's model: M LoRA members named ``member_0`` ... on one frozen causal LM (`build_ensemble`),
and the per-example loss the members train on and are recorded with (mean NLL over response tokens)."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from ..lora import LoraArguments
from .config import GradFilterConfig

MEMBER_PREFIX = "member_"



def _check_local(name: str, flag: str) -> None:
    looks_local = name.startswith((".", os.sep)) or name.count("/") > 1
    if looks_local and not os.path.isdir(name):
        raise FileNotFoundError(f"No model folder {name!r}: {flag} takes a folder saved with save_pretrained or a "
                                "Hub model id (e.g. gpt2).")


def check_causal_lm(name: str, flag: str, trust_remote_code: bool = False) -> None:
    """Refuse a model that `load_causal_lm` could not load, before any heavy work, reading its config only: a
    missing folder, a folder without a config, or a Hub id that cannot be reached (offline: not in the cache) is a
    one-line `FileNotFoundError` naming ``flag``."""
    from transformers import AutoConfig

    _check_local(name, flag)
    if os.path.isdir(name) and not any(os.path.isfile(os.path.join(name, f))
                                       for f in ("config.json", "adapter_config.json")):
        raise FileNotFoundError(f"The folder {name!r} ({flag}) holds no config.json: pass a folder saved with "
                                "save_pretrained, or a Hub model id.")
    if os.path.isfile(os.path.join(name, "adapter_config.json")):
        return  # a PEFT adapter folder: transformers loads its base model too
    try:
        AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
        raise FileNotFoundError(f"Cannot load the model {name!r} ({flag}): {detail}. Pass a folder saved with "
                                "save_pretrained, or a Hub id you can reach (offline: one in the cache).") from err


def load_causal_lm(name: str, flag: str = "--model_name_or_path", **model_kwargs):
    """``(model, tokenizer)`` of the causal LM ``name`` (a folder saved with ``save_pretrained`` or a Hub id). A
    missing folder or a model that cannot be fetched is a one-line `FileNotFoundError` naming ``flag``, not
    transformers' OSError (which calls a missing folder an invalid repo id)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    remote = model_kwargs.get("trust_remote_code", False)
    _check_local(name, flag)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=remote)
        return AutoModelForCausalLM.from_pretrained(name, **model_kwargs), tokenizer
    except OSError as err:
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
        raise FileNotFoundError(f"Cannot load the model {name!r} ({flag}): {detail}. Pass a folder saved with "
                                "save_pretrained, or a Hub id you can reach (offline: one in the cache).") from err


def member_name(m: int) -> str:
    return f"{MEMBER_PREFIX}{m}"


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over each row's labelled tokens: ``(B, T, V), (B, T) -> (B,)``.

    Rows with no labelled token get 0 (they are never batched by the trainer).
    """
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")  # (B, T-1)
    counts = (labels != -100).sum(dim=1)
    return nll.sum(dim=1) / counts.clamp(min=1)


def response_loss(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """`per_example_loss` from the last hidden states, running the LM head only where a label is.

    ``(B, T, d) hidden, head: d -> V, (B, T) labels -> (B,)``. Prompt and padding positions never
    reach the ``V``-wide head or the softmax: less compute, and no ``B x T x V`` logits tensor.
    """
    targets = labels[:, 1:]
    mask = targets != -100
    logits = head(hidden[:, :-1][mask]).float()  # (K, V), K = labelled positions in the batch
    nll = F.cross_entropy(logits, targets[mask], reduction="none")
    sums = torch.zeros(labels.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, mask.nonzero()[:, 0], nll)
    return sums / mask.sum(dim=1).clamp(min=1)


def head_splits(lm) -> bool:
    """Whether ``lm``'s logits are plain ``head(body(x))``, checked on a tiny input in eval mode.

    True for GPT-2, Llama and other plain causal LMs, so `response_loss` may run the head on
    response positions only; False for models that post-process their logits (soft-capping,
    scaling), which must take their full forward.
    """
    head = lm.get_output_embeddings()
    if head is None or lm.base_model is lm:
        return False
    device = next(lm.parameters()).device
    ids = torch.tensor([[1, 2, 3, 4]], device=device) % lm.config.get_text_config().vocab_size
    mask = torch.ones_like(ids)
    was_training = lm.training
    lm.eval()  # no dropout: the two forwards must be comparable
    with torch.no_grad():
        full = lm(input_ids=ids, attention_mask=mask).logits.float()
        split = head(lm.base_model(input_ids=ids, attention_mask=mask)[0]).float()
    lm.train(was_training)
    return split.shape == full.shape and bool(torch.allclose(split, full, rtol=1e-3, atol=1e-4))


def build_ensemble(model: PreTrainedModel, args: GradFilterConfig) -> PeftModel:
    """Wrap a frozen causal LM in ``args.num_members`` LoRA adapters, member m seeded ``seed + m``."""
    init = {"true": True, "false": False}.get(str(args.init_lora_weights).lower(), args.init_lora_weights)
    config = LoraArguments.from_fields(args).to_peft_config(
        init_lora_weights=init,
        fan_in_fan_out=any(isinstance(mod, Conv1D) for mod in model.modules()),  # GPT-2 stores W transposed
    )
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    peft_model = None
    for m in range(args.num_members):
        torch.manual_seed(args.seed + m)
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=member_name(m))
        else:
            peft_model.add_adapter(member_name(m), config)
    return peft_model
