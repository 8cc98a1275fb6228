"""`GradFilterConfig`: the `TrainingArguments` of the G-SNR proxy ensemble, in TRL's style."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..data.formatting import DataFormatArguments
from .sketch import sketch_factors

RECORD_MODES = ("train", "snapshot", "none")
SKETCH_STORAGES = ("members", "mean")
SKETCH_DTYPES = ("float32", "float16")


@dataclass
class GradFilterConfig(TrainingArguments, DataFormatArguments):
    r"""
    Configuration of [`GradFilterTrainer`]: the proxy ensemble, how gradients are recorded, and the
    data format. Every field is also a CLI flag of ``hf-gradfilter score`` (through
    `HfArgumentParser`). Only the fields below are specific to GradFiltering or have another
    default; see [`~transformers.TrainingArguments`] for the rest.

    > Parameters that control the ensemble

    num_members (`int`, *optional*, defaults to `5`):
        Ensemble size M: the number of LoRA adapters (``member_0`` ... ``member_{M-1}``) trained on
        one frozen backbone. Member m is initialised with seed ``seed + m`` and sees its own data
        order.
    lora_r (`int`, *optional*, defaults to `8`):
        LoRA rank of every member.
    lora_alpha (`int`, *optional*, defaults to `16`):
        LoRA alpha (scaling ``lora_alpha / lora_r``).
    lora_dropout (`float`, *optional*, defaults to `0.0`):
        LoRA dropout. 0 keeps the recorded norms deterministic.
    lora_target_modules (`list[str]`, *optional*):
        Modules that get LoRA; `None` uses PEFT's default for the architecture (GPT-2: ``c_attn``;
        Llama: ``q_proj``, ``v_proj``); ``all-linear`` targets every linear layer but the head.
    init_lora_weights (`str`, *optional*, defaults to `"true"`):
        PEFT's LoRA init: ``"true"`` (B = 0, A Kaiming-uniform), ``"gaussian"``, ``"pissa"``, ...

    > Parameters that control recording

    num_train_epochs (`float`, *optional*, defaults to `2`):
        Epochs E of proxy training (an integer); every member sees every example once per epoch.
    early_epoch (`int`, *optional*, defaults to `1`):
        The early epoch s of ``G_s`` (1-based).
    late_epoch (`int`, *optional*, defaults to `2`):
        The late epoch t of ``G_t`` and ``V_t`` (1-based, at most ``num_train_epochs``).
    record_mode (`str`, *optional*, defaults to `"train"`):
        ``"train"``: the norm at the training step that visits the example (free).
        ``"snapshot"``: a pass over all examples at the end of each epoch, at fixed weights
        (one extra forward and backward per example, member and epoch).
        ``"none"``: train the ensemble without recording (a baseline for overhead measurements).
    record_directions (`bool`, *optional*, defaults to `True`):
        Also record each gradient's cosine with its member's mean gradient over the batches visited
        earlier in the epoch (``GradientRecord.cosines``; the ``cos_late`` and ``gsnr_dir`` scores).
        Costs two small contractions per LoRA matrix and one gradient-sized vector per member.
    stack_members (`bool`, *optional*, defaults to `False`):
        Run the M members' batches of a step as one batch of M x B rows, each row through its own
        member's LoRA (one batched matmul per LoRA layer; `proxy.stacked`): one forward and one
        backward per step instead of M, for a device that one member's batch leaves idle. Same
        record, same members' gradients and updates (optimizer, scheduler and ``max_grad_norm``
        clipping stay per member), to float rounding; the M batches are padded to the widest of
        them and a step holds M times the activations. Off by default until measured faster on a
        GPU (benchmarks/run_throughput_gpu.sh). Not with ``fp16``, ``gradient_checkpointing`` or
        ``lora_dropout`` > 0.
    sketch_dim (`int`, *optional*, defaults to `0`):
        Also record a ``sketch_dim``-dimensional random projection of each example's full LoRA
        gradient per member (``GradientRecord.sketches``; `proxy.sketch`: unbiased inner products,
        computed in batch from the norm hooks). 0: off. Use a power of 2 (256 ... 2048). Storage:
        ``4 * num_members * len(sketch_epochs) * sketch_dim`` bytes per row (file-backed while training;
        ``sketch_storage`` and ``sketch_dtype`` make it smaller). Not with ``stack_members``.
    sketch_epochs (`list[int]`, *optional*):
        The epochs (1-based) to sketch; `None`: the late epoch only.
    sketch_seed (`int`, *optional*, defaults to `0`):
        Seed of the projection (recorded in the record's metadata); runs with the same seed, dim and
        LoRA layout have comparable sketches.
    sketch_storage (`str`, *optional*, defaults to `"members"`):
        ``"members"``: every member's sketch, ``(N, M, E_s, d)``. ``"mean"``: only their mean,
        ``(N, 1, E_s, d)``, M times smaller (kept as a float32 sum while training). The near-duplicate
        flags and the clusters use the member mean either way (unchanged); target alignment then compares
        member means (the cosine of the mean gradients, not the mean of the members' cosines; the cost of
        that is measured in docs/ann_search.md).
    sketch_dtype (`str`, *optional*, defaults to `"float32"`):
        ``"float16"`` halves the storage (each value rounded to 11 significant bits; values beyond
        65504 raise); readers compute in float32. Per row: ``4`` (float32) or ``2`` (float16) bytes times
        ``d * len(sketch_epochs)`` times M (``members``) or 1 (``mean``): at 1M rows, M = 5, d = 1024, one
        epoch, 20.5 GB, 10.2 GB, 4.1 GB or 2.0 GB.

    > Parameters that control the data

    max_length (`int`, *optional*, defaults to `512`):
        Rows are cut to this many tokens; cut rows are counted, rows left with no response token
        get NaN scores.
    dataset_format (`str`, *optional*, defaults to `"auto"`):
        ``alpaca`` (instruction/input/output), ``prompt_completion``, ``messages`` or ``auto``.
    instruction_column, input_column, output_column, prompt_column, completion_column,
    messages_column (`str`):
        Column names of the formats above.

    > Defaults that differ from `TrainingArguments`

    learning_rate (`float`, defaults to `2e-4`): the members' LoRA rate. The paper's is 5e-5 (GPT-2 on 52k rows,
        13k steps); on SmolLM2-135M with a few hundred rows that proxy barely learned (response loss -1%) and no
        keep-score passed the rule of docs/default_choice.md, while at 2e-4 it learned (-4 to -5%) and the
        default ``neg_energy_token`` passed it, confirmed on a held-out pool (docs/real_quality.md).
        ``--learning_rate 5e-5`` gives the paper's recipe.
    per_device_train_batch_size (`int`, defaults to `8`): examples per member per step.
    logging_steps (`float`, defaults to `10`), save_strategy (defaults to `"no"`),
    report_to (defaults to `"none"`).
    train_sampling_strategy (`str`, defaults to `"group_by_length"`): each member's batches hold
        rows of similar length (mega-batches of 50 batches sorted by length, batch order shuffled),
        so little compute goes to padding; ``"random"`` for plain shuffled batches.
    """

    num_members: int = field(default=5, metadata={"help": "Ensemble size M (number of LoRA members)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of every member."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha of every member."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (0 keeps norms deterministic)."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules that get LoRA (default: PEFT's choice for the architecture; 'all-linear')."},
    )
    init_lora_weights: str = field(
        default="true", metadata={"help": "PEFT LoRA init: 'true' (B=0), 'gaussian', 'pissa', 'olora', ..."}
    )
    early_epoch: int = field(default=1, metadata={"help": "Early epoch s of G_s (1-based)."})
    late_epoch: int = field(default=2, metadata={"help": "Late epoch t of G_t and V_t (1-based)."})
    record_mode: str = field(
        default="train",
        metadata={"help": "'train': norm at the step that visits the example; 'snapshot': end-of-epoch "
                          "pass at fixed weights; 'none': no recording.",
                  "choices": list(RECORD_MODES)},
    )
    record_directions: bool = field(
        default=True, metadata={"help": "Also record each gradient's cosine with its member's running mean "
                                        "gradient of the epoch (the cos_late and gsnr_dir scores)."})
    stack_members: bool = field(
        default=False, metadata={"help": "Run the M members' batches as one batch of M x B rows (one forward and "
                                         "backward per step; same record). Not with fp16, gradient checkpointing "
                                         "or LoRA dropout."})
    sketch_dim: int = field(default=0, metadata={"help": "Dimension of each example's gradient sketch (a random "
                                                          "projection of its LoRA gradient); 0: off. E.g. 1024."})
    sketch_epochs: list[int] | None = field(
        default=None, metadata={"help": "Epochs (1-based) to sketch; default: the late epoch only."})
    sketch_seed: int = field(default=0, metadata={"help": "Seed of the sketch projection."})
    sketch_storage: str = field(default="members", metadata={
        "help": "'members': every member's sketch; 'mean': only the member mean (M times smaller).",
        "choices": list(SKETCH_STORAGES)})
    sketch_dtype: str = field(default="float32", metadata={
        "help": "Sketch values in 'float32' or 'float16' (half the storage).", "choices": list(SKETCH_DTYPES)})
    max_length: int = field(default=512, metadata={"help": "Maximum tokens per row (longer rows are cut)."})

    # TrainingArguments fields with other defaults
    num_train_epochs: float = field(default=2.0, metadata={"help": "Proxy training epochs (an integer)."})
    learning_rate: float = field(default=2e-4, metadata={
        "help": "Members' LoRA learning rate (the paper: 5e-5; 2e-4 passed docs/real_quality.md)."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Examples per member per step."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X updates steps."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpoint strategy (no, steps, epoch)."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Integrations to log to."})
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={"help": "'group_by_length' (each member's batches hold rows of similar length: little padding) "
                          "or 'random'.", "choices": ["group_by_length", "random"]},
    )

    def __post_init__(self):
        if self.stack_members:
            unsupported = {"fp16": self.fp16, "gradient_checkpointing": self.gradient_checkpointing,
                           f"lora_dropout={self.lora_dropout}": self.lora_dropout > 0}
            bad = [name for name, on in unsupported.items() if on]
            if bad:
                raise ValueError(f"stack_members=True does not support {', '.join(bad)}: use bf16 or fp32, no gradient "
                                 "checkpointing and lora_dropout=0, or set stack_members=False.")
        super().__post_init__()
        if self.num_members < 1:
            raise ValueError(f"num_members={self.num_members}: the ensemble needs at least 1 member (paper: 5).")
        if self.record_mode not in RECORD_MODES:
            raise ValueError(f"record_mode={self.record_mode!r}: choose one of {', '.join(RECORD_MODES)}.")
        epochs = self.num_train_epochs
        if epochs != int(epochs) or epochs < 1:
            raise ValueError(f"num_train_epochs={epochs}: the proxy trains whole epochs; use an integer >= 1.")
        if self.max_steps is not None and self.max_steps > 0:
            raise ValueError(f"max_steps={self.max_steps}: the record needs whole epochs; use num_train_epochs.")
        for name in ("early_epoch", "late_epoch"):
            value = getattr(self, name)
            if not 1 <= value <= epochs:
                raise ValueError(
                    f"{name}={value} is outside the {int(epochs)} epoch(s) trained; "
                    f"use 1..{int(epochs)} or raise num_train_epochs."
                )
        self._check_sketch()
        if self.max_length < 2:
            raise ValueError(f"max_length={self.max_length}: use at least 2 tokens.")

    def _check_sketch(self) -> None:
        for name, allowed in (("sketch_storage", SKETCH_STORAGES), ("sketch_dtype", SKETCH_DTYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {', '.join(allowed)}.")
        if not self.sketch_dim:
            return
        sketch_factors(self.sketch_dim)  # raises for a dim that does not split well
        if self.stack_members or self.record_mode == "none":
            raise ValueError(f"sketch_dim={self.sketch_dim} needs recording without stack_members (got "
                             f"record_mode={self.record_mode!r}, stack_members={self.stack_members}).")
        if self.sketch_epochs is None:
            self.sketch_epochs = [self.late_epoch]
        bad = [e for e in self.sketch_epochs if not 1 <= e <= self.num_train_epochs]
        if bad or not self.sketch_epochs or len(set(self.sketch_epochs)) != len(self.sketch_epochs):
            raise ValueError(f"sketch_epochs={self.sketch_epochs}: give distinct epochs in "
                             f"1..{int(self.num_train_epochs)}.")
