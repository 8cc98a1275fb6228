"""LoRA settings: one dataclass for every adapter the library trains, in TRL's `ModelConfig` field names.

The target's adapter (`finetune` verb: ``--lora_r ...``; `run`: the same fields behind ``--target_``) and the
proxy's members (`GradFilterConfig`: ``--lora_r ...`` with the proxy's defaults) are all read by
`LoraArguments.from_fields` and turned into PEFT's `LoraConfig` by `LoraArguments.to_peft_config`, so the
fields, their defaults for the target, their help and the PEFT call exist once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from peft import LoraConfig


@dataclass
class LoraArguments:
    """A LoRA adapter's settings (defaults: the target's, rank 16 on every linear layer, a common 7B recipe).

    lora_r (`int`, defaults to `16`): the rank r of ``B A`` (``A``: ``(r, d_in)``, ``B``: ``(d_out, r)``).
    lora_alpha (`int`, defaults to `32`): the update is scaled by ``lora_alpha / lora_r``.
    lora_dropout (`float`, defaults to `0.05`): dropout on the adapter's input.
    lora_target_modules (`list[str]`, defaults to `["all-linear"]`): module names that get LoRA; ``all-linear``
        targets every linear layer but the output head; `None` uses PEFT's default for the architecture.
    """

    lora_r: int = field(default=16, metadata={"help": "LoRA rank of the target adapter."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha of the target adapter."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout of the target adapter."})
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: ["all-linear"], metadata={"help": "Modules that get LoRA ('all-linear' or names)."})

    @classmethod
    def from_fields(cls, args: Any, prefix: str = "") -> LoraArguments:
        """The LoRA fields of any settings object, read as ``{prefix}lora_r`` etc. (`run`: ``prefix="target_"``);
        a field ``args`` lacks keeps its default here."""
        values = {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls)
                  if hasattr(args, prefix + f.name)}
        return cls(**values)

    @classmethod
    def prefixed_field(cls, name: str, prefix: str = "target_"):
        """A dataclass field for ``{prefix}{name}`` with ``name``'s default and help (for a settings class that holds
        several adapters' fields, as `run` does)."""
        source = {f.name: f for f in dataclasses.fields(cls)}[name]
        kind = {"default": source.default} if source.default is not dataclasses.MISSING else {
            "default_factory": source.default_factory}
        return field(**kind, metadata=dict(source.metadata))

    def to_peft_config(self, **extra) -> LoraConfig:
        """PEFT's causal-LM `LoraConfig` of these settings; ``extra`` (e.g. ``init_lora_weights``,
        ``fan_in_fan_out``) passes through."""
        targets = self.lora_target_modules
        if targets is not None and list(targets) == ["all-linear"]:
            targets = "all-linear"  # PEFT's keyword is a string, not a one-name list
        return LoraConfig(task_type="CAUSAL_LM", r=self.lora_r, lora_alpha=self.lora_alpha,
                          lora_dropout=self.lora_dropout, target_modules=targets, **extra)
