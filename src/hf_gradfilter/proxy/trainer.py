"""`GradFilterTrainer`: M LoRA members on one frozen backbone, trained in one run, recording
every example's per-member gradient norm and loss (the `GradientRecord`).

One optimizer step = one batch per member, each drawn from that member's own data order:

    for m in members:                     # PEFT adapter "member_m" active
        loss_i = mean NLL over response tokens of example i          (B,)
        backward( mean_i loss_i )         # hooks add up ||d loss_i / d LoRA_m||^2 for all i
    clip each member's gradient by itself; one AdamW step for all members

The ensemble objective is the sum of member losses (the mean up to the constant M, which would
otherwise leak into Adam's epsilon and gradient clipping): member m gets exactly the update it
would get if trained alone with the same seed and data order.

Directions (``record_directions``, on by default): member m also keeps a reference direction

    S_m = sum of g_j over the rows j of m's batches visited earlier in this epoch (zeroed when an epoch starts)

with ``g_j`` the raw per-example gradient (same mean-NLL loss as the norms; before clipping and
averaging) at the step that visited j, and the record gets ``cos(g_i, S_m)`` for each example i of
the next batch (NaN for m's first batch of the epoch). In snapshot mode the same holds at the fixed
end-of-epoch weights, over batches visited in a seeded per-member order. Why this reference: it is
the member's mean descent direction of the epoch so far (the cosine ignores the 1/count), it needs
one pass and no second backward (dots and batch sums come from the norm hooks, `norms.grad_dots`),
it exists in every epoch including the first, and in snapshot mode it is taken at the same weights
as the gradient it is compared with. Under several processes each batch's gradient sum is summed
over processes (one all-reduce of a member's LoRA size per member batch), so the reference is the
global one. Extra memory: M LoRA-sized references and one batch sum.

Host memory: the record and each member's data order (`MemberSampler.order`) are never held in
memory. Their arrays are ``np.memmap`` on unnamed temporary files in ``output_dir`` (gone when the
process ends); the record is filled as batches are recorded and saved from the mapping, and the
dataset's columns are read in chunks of rows. See docs/memory.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Trainer, TrainerCallback
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging

from .config import GradFilterConfig
from ..data.columns import column_chunks, num_repeats, read_int_columns
from ..data.formatting import tokenize_dataset
from .norms import LoraNormRecorder
from .record import GradientRecord, file_array, read_record_arrays

logger = logging.get_logger(__name__)

MEMBER_PREFIX = "member_"
DIRECTIONS_NAME = "gradfilter_directions.safetensors"  # checkpoints: the reference directions in progress
GATHER_CHUNK_VALUES = 1 << 20  # values per all-reduce when merging the processes' records (4 MB of float32)


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


class MemberSampler(Sampler[list]):
    """A batch sampler: each step, one batch of rows per member, each from that member's own order.

    Member m's order in epoch e comes from ``default_rng([seed, m, e])``: reproducible, and
    independent of how many members or processes there are. With ``lengths`` (length-grouped
    batching, the default), each member's permutation is cut into mega-batches of
    ``mega_batch_mult`` batches, each sorted by length and split into batches whose order is then
    shuffled, as in `transformers`' `LengthGroupedSampler`: rows of similar length share a batch,
    so little compute is padding. The one short batch (``n % global_batch``) is always last.

    Distributed: the *global* batches (``batch_size * num_replicas`` rows) are the ones a single
    process with that batch size would use, and process ``rank`` takes its slice of each, so every
    row is visited exactly once per member and epoch and the optimizer sees the same global batch
    as one process would. A process whose slice of the last batch is empty gets one row with
    weight 0 (no gradient, not recorded), so all processes take the same number of steps.

    Each step yields ``(row, epoch, weight, global_batch_size)`` tuples, members one after another.
    """

    def __init__(self, num_rows: int, num_members: int, batch_size: int, seed: int, lengths=None,
                 mega_batch_mult: int = 50, num_replicas: int = 1, rank: int = 0, directory: str | None = None):
        self.n, self.num_members, self.seed, self.directory = num_rows, num_members, seed, directory
        self.num_replicas, self.rank = num_replicas, rank
        self.batch_size = batch_size * num_replicas  # global
        self.lengths = None if lengths is None else np.asarray(lengths)
        if (self.lengths is not None and np.issubdtype(self.lengths.dtype, np.integer)
                and self.lengths.dtype.itemsize > 4 and self.lengths.max(initial=0) < 2**31):
            self.lengths = self.lengths.astype(np.int32)  # token counts: 4 bytes a row is plenty
        self.mega = max(1, min(mega_batch_mult, num_rows // (4 * self.batch_size)))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, member: int, epoch: int) -> np.ndarray:
        """Member ``member``'s rows in epoch ``epoch`` (0-based) in visiting order: global batch k is
        ``order[k * batch_size : (k + 1) * batch_size]``.

        One int32 array of N (int64 from 2^31 rows), rearranged in place: 4 bytes per row and member,
        in an unnamed file in ``directory`` when the sampler has one (`record.file_array`).
        """
        rng = np.random.default_rng([self.seed, member, epoch])
        dtype = np.int32 if self.n < 2**31 else np.int64
        order = file_array((self.n,), dtype, 0, self.directory)
        for start in range(0, self.n, 1 << 20):  # 0, 1, ..., n-1 without a whole temporary
            order[start : start + (1 << 20)] = np.arange(start, min(start + (1 << 20), self.n), dtype=dtype)
        rng.shuffle(order.view(np.ndarray))  # = rng.permutation(n) without an int64 copy (a memmap subclass
        # would take numpy's slow per-element path: 250x slower at 1M rows; the view writes the same file)
        b = self.batch_size
        full = self.n - self.n % b
        if self.lengths is not None:
            for start in range(0, full, b * self.mega):  # each mega-batch sorted by length, longest first
                chunk = order[start : min(start + b * self.mega, full)]
                chunk[:] = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            perm = rng.permutation(full // b)  # then the order of its full batches is shuffled
            order[:full] = order[:full].reshape(-1, b)[perm].reshape(-1)
        return order

    def batches(self, member: int, epoch: int) -> list[np.ndarray]:
        """Member ``member``'s global batches (row positions) in epoch ``epoch`` (0-based), in order:
        views into `order`."""
        order, b = self.order(member, epoch), self.batch_size
        return [order[i : i + b] for i in range(0, self.n, b)]

    def __iter__(self):
        orders, b = [self.order(m, self.epoch) for m in range(self.num_members)], self.batch_size
        for start in range(0, self.n, b):
            items = []
            for order in orders:
                batch = order[start : start + b]
                mine = np.array_split(batch, self.num_replicas)[self.rank]
                if len(mine):
                    items += [(int(i), self.epoch, 1.0, len(batch)) for i in mine]
                else:  # keep step counts equal across processes: a zero-weight stand-in
                    items.append((int(batch[0]), self.epoch, 0.0, len(batch)))
            yield items

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def padding_ratio(self, epoch: int = 0) -> float:
        """Tokens computed / real tokens over one epoch of every member (needs ``lengths``)."""
        computed = sum(len(bt) * self.lengths[bt].max() for m in range(self.num_members)
                       for bt in self.batches(m, epoch))
        return float(computed / (self.num_members * self.lengths.sum()))


class _Rows(Dataset):
    """Rows of a tokenized dataset fetched by ``(row, epoch, weight, global_batch_size)`` keys."""

    def __init__(self, dataset):
        self.dataset = dataset.select_columns(["example_id", "input_ids", "labels"])

    def __len__(self):
        return len(self.dataset)

    def __getitems__(self, keys):
        rows = self.dataset[[k[0] for k in keys]]
        return [{"example_id": rows["example_id"][j], "input_ids": rows["input_ids"][j], "labels": rows["labels"][j],
                 "epoch": k[1], "weight": k[2], "global_batch": k[3]} for j, k in enumerate(keys)]

    def __getitem__(self, key):
        return self.__getitems__([key])[0]


class _EpochLoader(DataLoader):
    """A DataLoader whose `set_epoch` reaches its `MemberSampler` (the Trainer calls it each epoch)."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


def pad_batch(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids``/``labels`` of a list of rows into tensors with an attention mask."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        k = len(f["input_ids"])
        ids[i, :k] = torch.tensor(f["input_ids"])
        labels[i, :k] = torch.tensor(f["labels"])
        mask[i, :k] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "example_id": torch.tensor([f["example_id"] for f in features], dtype=torch.long),
        "weight": torch.tensor([f.get("weight", 1.0) for f in features], dtype=torch.float32),
    }


class MemberCollator:
    """Splits a step's rows (members one after another, equally many each) into M padded batches."""

    def __init__(self, num_members: int, pad_token_id: int):
        self.num_members, self.pad_token_id = num_members, pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        b = len(features) // self.num_members
        return {
            "members": [pad_batch(features[m * b : (m + 1) * b], self.pad_token_id) for m in range(self.num_members)],
            "epoch": features[0]["epoch"],
            "global_batch": features[0]["global_batch"],
        }


class _SnapshotCallback(TrainerCallback):
    def __init__(self, trainer: GradFilterTrainer):
        self.trainer = trainer

    def on_epoch_end(self, args, state, control, **kwargs):
        self.trainer.snapshot(epoch=int(round(state.epoch)) - 1)


def build_ensemble(model: PreTrainedModel, args: GradFilterConfig) -> PeftModel:
    """Wrap a frozen causal LM in ``args.num_members`` LoRA adapters, member m seeded ``seed + m``."""
    init = {"true": True, "false": False}.get(str(args.init_lora_weights).lower(), args.init_lora_weights)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules,
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


class GradFilterTrainer(Trainer):
    """Trains the G-SNR proxy ensemble and records per-example gradient norms.

    Args:
        model: a causal LM (`PreTrainedModel`) or its Hub id / local path. It is frozen and wrapped
            in ``args.num_members`` LoRA adapters; pass an existing `PeftModel` with adapters named
            ``member_0`` ... to reuse one.
        args: a `GradFilterConfig`.
        train_dataset: raw instruction rows (`datasets.Dataset` in alpaca, prompt_completion or
            messages format). Every row is scored; rows with no response token after truncation
            get NaN.
        processing_class: the tokenizer (a fast one); loaded from ``model`` when it is a string. Not
            needed for pre-tokenized rows (``input_ids`` + ``labels`` columns).

    After `train()`, ``trainer.record`` holds the `GradientRecord`; `save_model()` writes every
    member as a PEFT adapter (``<output_dir>/member_m``) and the record beside them.
    """

    def __init__(self, model, args: GradFilterConfig | None = None, train_dataset=None, processing_class=None,
                 callbacks=None, **kwargs):
        args = args or GradFilterConfig(output_dir="gradfilter_output")
        if not isinstance(args, GradFilterConfig):
            raise TypeError(f"args must be a GradFilterConfig, got {type(args).__name__}.")
        if train_dataset is None:
            raise ValueError("GradFilterTrainer needs a train_dataset: the rows to score.")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            processes = torch.distributed.get_world_size()
            if processes != args.world_size:  # each process would score every row on its own
                raise ValueError(
                    f"{processes} processes were launched but the Trainer sees world_size={args.world_size} "
                    f"(parallel mode {args.parallel_mode.value}): on a machine without a GPU pass --use_cpu true "
                    "(GradFilterConfig(use_cpu=True)) so the processes train together on CPU."
                )
        if isinstance(model, str):
            processing_class = processing_class or AutoTokenizer.from_pretrained(model)
            model = AutoModelForCausalLM.from_pretrained(model)
        tokenizer = processing_class
        pretokenized = {"input_ids", "labels"} <= set(train_dataset.column_names)
        if tokenizer is None and not pretokenized:
            raise ValueError("Pass processing_class=tokenizer (a fast tokenizer matching the proxy model).")
        if tokenizer is not None and tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        config = getattr(model, "config", None)
        self.pad_token_id = next((i for i in (
            getattr(tokenizer, "pad_token_id", None), getattr(config, "pad_token_id", None),
            getattr(config, "eos_token_id", None)) if isinstance(i, int)), 0)

        tokenized, fmt = tokenize_dataset(train_dataset, tokenizer, args.instruction_format, args.max_length)
        self.tokenized = tokenized
        self.instruction_format = fmt
        # One pass over the columns in chunks of rows: counts, the trainable rows, and each row's id and
        # hash, written straight into files (the record's; see `GradientRecord.empty`).
        n = len(tokenized)
        index_dtype = np.int32 if n < 2**31 else np.int64
        ids, hashes = (file_array((n,), np.int64, 0, args.output_dir) for _ in range(2))
        keep, num_empty, num_truncated = [], 0, 0
        names = ["example_id", "row_hash", "num_response_tokens", "empty_response", "truncated"]
        for start, chunk in column_chunks(tokenized, names):
            stop = start + len(chunk["example_id"])
            ids[start:stop], hashes[start:stop] = chunk["example_id"], chunk["row_hash"]
            keep.append(np.flatnonzero(chunk["num_response_tokens"] > 0).astype(index_dtype) + index_dtype(start))
            num_empty += int(np.count_nonzero(chunk["empty_response"]))
            num_truncated += int(np.count_nonzero(chunk["truncated"]))
        trainable = np.concatenate(keep) if keep else np.empty(0, dtype=index_dtype)
        del keep
        # Policies and how the counts relate: the "Odd input" section of `formatting`'s docstring.
        self.data_stats = {
            "num_rows": n,
            "num_truncated": num_truncated,
            "num_no_response": int(n - len(trainable)),  # includes the empty-response rows
            "num_empty_response": num_empty,
            "num_duplicate_rows": num_repeats(hashes),  # rows whose row_hash came earlier
            "max_length": args.max_length,
        }
        num_cut = self.data_stats["num_no_response"] - num_empty
        if len(trainable) == 0:
            raise ValueError(
                f"No row has a response token: {num_empty} row(s) have an empty response and {num_cut} lose "
                f"their whole response to truncation at max_length={args.max_length}; fill in the responses "
                "or raise max_length."
            )
        if self.data_stats["num_no_response"]:
            logger.warning(
                f"{self.data_stats['num_no_response']} row(s) have no response token and get NaN scores: "
                f"{num_empty} with an empty response, {num_cut} whose response is cut off by "
                f"max_length={args.max_length}."
            )
        if self.data_stats["num_duplicate_rows"]:
            logger.warning(
                f"{self.data_stats['num_duplicate_rows']} row(s) repeat an earlier row's content (same row_hash); "
                "each copy is trained on and scored independently. Deduplicate the dataset first if that is not "
                "what you want."
            )

        if not isinstance(model, PeftModel):
            model = build_ensemble(model, args)
        self.member_names = [member_name(m) for m in range(args.num_members)]
        missing = [n for n in self.member_names if n not in model.peft_config]
        if missing:
            raise ValueError(f"The PeftModel lacks adapters {missing}; adapters must be named member_0 ... ")

        callbacks = list(callbacks or [])
        if args.record_mode == "snapshot":
            callbacks.append(_SnapshotCallback(self))
        train_rows = tokenized if len(trainable) == n else tokenized.select(trainable)  # all rows: no index map
        del trainable
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_rows,
            processing_class=tokenizer,
            data_collator=MemberCollator(args.num_members, self.pad_token_id),
            callbacks=callbacks,
            **kwargs,
        )
        self.recorder = LoraNormRecorder(self.model, self.member_names, directions=args.record_directions)
        self._direction_epoch = None  # the epoch the references belong to
        # This process's rows, in unnamed files in output_dir: the record is not held in memory.
        self._local = GradientRecord.empty(
            ids,
            hashes,
            args.num_members,
            int(args.num_train_epochs),
            directory=args.output_dir,
            copy=False,  # ids and hashes are already in files of their own
            metadata={
                "record_mode": args.record_mode,
                "format": fmt.__dict__,
                "data_stats": self.data_stats,
                "dataset_fingerprint": getattr(train_dataset, "_fingerprint", None),
                "members": self.member_names,
                "base_model": getattr(self.model.peft_config[self.member_names[0]], "base_model_name_or_path", None),
                "config": {k: v for k, v in args.to_dict().items() if not k.endswith("token")},
            },
        )
        self.record = self._local  # this process's rows; `gather_record` merges all processes'
        self._merged = None  # with several processes: the merged record (files too), made by the first gather
        self._member_loss = torch.zeros(args.num_members)
        self._member_loss_steps = 0
        self.num_rerecorded_batches = 0  # member batches whose gradients overflowed and were recorded again

    # ---- data ----------------------------------------------------------------------------------

    def get_train_dataloader(self) -> DataLoader:
        """Each process reads its own slice of every global batch (see `MemberSampler`), so the
        loader is not sharded again by accelerate; `_prepare_inputs` moves batches to the device."""
        a = self.args
        self.sampler = MemberSampler(
            len(self.train_dataset), a.num_members, a.per_device_train_batch_size,
            a.data_seed if a.data_seed is not None else a.seed,
            lengths=(read_int_columns(self.train_dataset, ["length"])["length"]
                     if a.train_sampling_strategy == "group_by_length" else None),
            num_replicas=a.world_size, rank=a.process_index, directory=a.output_dir)
        return _EpochLoader(_Rows(self.train_dataset), batch_sampler=self.sampler, collate_fn=self.data_collator,
                            num_workers=a.dataloader_num_workers, pin_memory=a.dataloader_pin_memory)

    def floating_point_ops(self, inputs) -> int:
        return 0

    # ---- training ------------------------------------------------------------------------------

    def _activate(self, name) -> None:
        self.accelerator.unwrap_model(self.model).base_model.set_adapter(name)

    def train(self, *args, **kwargs):
        self._activate(self.member_names)  # every member trainable when the optimizer is built
        try:
            output = super().train(*args, **kwargs)
        finally:
            self._activate(self.member_names)
        count = torch.tensor(self.num_rerecorded_batches, device=self.args.device)
        if self.args.world_size > 1:
            torch.distributed.all_reduce(count)
        if count.item():
            self._local.metadata["num_rerecorded_batches"] = int(count.item())
            logger.warning(f"{int(count.item())} member batch(es) overflowed (fp16 loss scale) and were recorded "
                           "again in float32; the loss scaler skips the optimizer step of such a batch.")
        self.gather_record()
        return output

    def _member_forward(self, model, batch, mixed_precision: bool = True) -> torch.Tensor:
        """Per-example mean response loss ``(B,)`` of the active member (``mixed_precision=False``:
        in float32 even under ``--fp16`` / ``--bf16``)."""
        split = self._split_head()
        if mixed_precision:  # the split path calls the body directly, past accelerate's autocast on the
            context = contextlib.ExitStack()  # model's forward: enter it here (a no-op in fp32)
            context.enter_context(self.compute_loss_context_manager())
            context.enter_context(self.accelerator.autocast())
        else:  # and go around that patched forward when mixed precision must be off
            context = torch.autocast(self.args.device.type, enabled=False)
            model = getattr(self.accelerator.unwrap_model(model), "_original_forward", model)
        with context:
            if split:
                lm = self.accelerator.unwrap_model(self.model).get_base_model()
                hidden = lm.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
                return response_loss(hidden, lm.get_output_embeddings(), batch["labels"])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return per_example_loss(logits, batch["labels"])

    def _split_head(self) -> bool:
        """Whether the head may run on response positions only (`head_splits`, checked once)."""
        if getattr(self, "_split_head_ok", None) is None:
            self._split_head_ok = head_splits(self.accelerator.unwrap_model(self.model).get_base_model())
        return self._split_head_ok

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        epoch, global_batch = int(inputs["epoch"]), int(inputs["global_batch"])
        record = self.args.record_mode == "train"
        directions = record and self.args.record_directions
        if directions and epoch != self._direction_epoch:  # a new epoch: S_m starts again from zero
            self.recorder.reset_directions()
            self._direction_epoch = epoch
        ga, world = self.current_gradient_accumulation_steps, self.args.world_size
        total = torch.zeros((), device=self.args.device)
        # Gradients are averaged over processes once per optimizer step (`_sync_gradients`), not per backward.
        with self.accelerator.no_sync(model):
            for m, (name, batch) in enumerate(zip(self.member_names, inputs["members"])):
                self._activate(name)
                if record:
                    self.recorder.start(len(batch["input_ids"]), self.args.device, member=name)
                losses = self._member_forward(model, batch)
                weight = batch["weight"]
                # after averaging over processes: sum of loss_i over the global batch / its size / ga
                loss = (losses * weight).sum() * world / (global_batch * ga)
                self.accelerator.backward(loss)
                self._check_finite(losses, batch["example_id"], name)
                if record:  # backward saw loss_i * world / (global_batch * ga) (times the fp16 loss scale)
                    scale = world * self._loss_scale() / (global_batch * ga)
                    norms = self.recorder.stop(grad_scale=scale).sqrt() / scale
                    keep = weight > 0
                    if not torch.isfinite(norms[keep]).all():
                        if not self._loss_scaled():
                            self._fail("gradient norm", batch["example_id"][keep & ~torch.isfinite(norms)].tolist(),
                                       name, "Lower the learning rate.")
                        # an fp16 overflow under the loss scale: record this batch again
                        norms = self._rerecord(model, batch, name, weight, world / (global_batch * ga), directions)
                    cosines = None if self.recorder.cosines is None else self.recorder.cosines[keep]
                    self._store(batch["example_id"][keep], m, epoch, norms[keep], losses[keep], cosines)
                    if directions:  # the batch joins member m's reference (summed over processes)
                        self.recorder.commit(name, self._reduce)
                member_loss = (losses.detach() * weight).sum() / weight.sum().clamp(min=1)
                total += member_loss / ga
                self._member_loss[m] += member_loss.cpu()
        self._member_loss_steps += 1
        return total / len(self.member_names)

    def _rerecord(self, model, batch, name, weight, scale, directions) -> torch.Tensor:
        """The batch's norms (and cosines, batch gradient sum) again, from a float32 forward and a
        backward of the unscaled loss that leaves the parameters' gradients alone.

        Used when a batch's per-example gradients overflowed: with ``--fp16`` the loss scaler's
        factor (65536 at first) can push a layer's output gradients past float16's range. The
        scaler then skips the optimizer step, as in any fp16 training; this makes sure the record
        still holds the batch's true values. If they are still not finite, the error names the rows.
        """
        # A plain backward (reentrant checkpointing cannot take autograd.grad), its gradients put back.
        params = [p for p in self.accelerator.unwrap_model(model).parameters() if p.requires_grad]
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        self.recorder.start(len(batch["input_ids"]), self.args.device, member=name if directions else None)
        losses = self._member_forward(model, batch, mixed_precision=False)
        ((losses * weight).sum() * scale).backward()
        norms = self.recorder.stop(grad_scale=scale).sqrt() / scale
        for p, grad in zip(params, saved):
            p.grad = grad
        bad = (weight > 0) & ~torch.isfinite(norms)
        if bad.any():
            self._fail("gradient norm (also in float32)", batch["example_id"][bad].tolist(), name,
                       "Lower the learning rate.")
        self.num_rerecorded_batches += 1
        logger.info(f"Gradients of a {name} batch overflowed at global step {self.state.global_step}; "
                    "its norms were recorded again in float32.")
        return norms

    def _loss_scaled(self) -> bool:
        """Whether backward passes run under a loss scaler (``--fp16``), whose overflows `_rerecord` handles."""
        scaler = getattr(self.accelerator, "scaler", None)
        return scaler is not None and scaler.is_enabled()

    def _loss_scale(self) -> float:
        return float(self.accelerator.scaler.get_scale()) if self._loss_scaled() else 1.0

    def _check_finite(self, losses, example_ids, name):
        bad = ~torch.isfinite(losses.detach())
        if bad.any():
            self._fail("loss", example_ids[bad].tolist(), name, "Lower the learning rate, or use fp32.")

    def _fail(self, what: str, ids: list[int], name: str, fix: str):
        """Save the partial record (nothing recorded is lost) and raise, naming the rows and the step."""
        self._local.save(self.args.output_dir if self.args.world_size <= 1 else
                         os.path.join(self.args.output_dir, f"partial_record_rank{self.args.process_index}"))
        raise FloatingPointError(f"Non-finite {what} for example id(s) {ids[:20]} ({name}, global step "
                                 f"{self.state.global_step}); the partial record was saved. {fix}")

    def _store(self, example_ids, m, epoch, norms, losses, cosines=None) -> None:
        rows = example_ids.cpu().numpy()
        self._local.norms[rows, m, epoch] = norms.detach().float().cpu().numpy()
        self._local.losses[rows, m, epoch] = losses.detach().float().cpu().numpy()
        if cosines is not None:
            self._local.cosines[rows, m, epoch] = cosines.detach().float().cpu().numpy()

    # ---- distributed ---------------------------------------------------------------------------

    def _sync_gradients(self) -> None:
        """Average the LoRA gradients over processes (one all-reduce per optimizer step)."""
        if self.args.world_size <= 1:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad for p in self.accelerator.unwrap_model(self.model).parameters() if p.grad is not None]
        flat = _flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat)
        flat /= self.args.world_size
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)

    @property
    def _reduce(self):
        """`LoraNormRecorder.commit`'s ``all_reduce``: a sum over processes, or None with one process."""
        return torch.distributed.all_reduce if self.args.world_size > 1 else None

    def gather_record(self) -> GradientRecord:
        """Combine every process's recorded rows into ``self.record`` (a collective call).

        The merge runs in blocks of rows (`GATHER_CHUNK_VALUES` values per all-reduce) into a second
        file-backed record, allocated once, so no process holds a whole record in memory.

        Raises if any (example, member, epoch) was recorded by more than one process.
        """
        if self.args.world_size <= 1:
            self.record = self._local
            return self.record
        local = self._local
        if self._merged is None:
            self._merged = GradientRecord.empty(local.example_id, local.row_hash, local.num_members, local.num_epochs,
                                                directory=self.args.output_dir, copy=False)
            self._merged.metadata = local.metadata  # one dict: what the trainer adds later shows in both
        step = max(1, GATHER_CHUNK_VALUES // (local.num_members * local.num_epochs))  # rows per all-reduce
        for key in ("norms", "losses", "cosines"):
            source, target = getattr(local, key), getattr(self._merged, key)
            for start in range(0, local.num_examples, step):
                block = torch.from_numpy(np.array(source[start : start + step]))
                values = torch.nan_to_num(block, nan=0.0).to(self.args.device)
                counts = (~torch.isnan(block)).to(torch.int32).to(self.args.device)
                torch.distributed.all_reduce(values)
                torch.distributed.all_reduce(counts)
                values, counts = values.cpu().numpy(), counts.cpu().numpy()
                if (counts > 1).any():
                    rows = local.example_id[start + np.unique(np.nonzero(counts > 1)[0])][:10].tolist()
                    raise RuntimeError(f"Example id(s) {rows} were recorded by more than one process.")
                target[start : start + step] = np.where(counts == 1, values, np.nan)
        self.record = self._merged
        return self.record

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None:  # no clipping this run: `_clip_grad_norm` did not sync
            self._sync_gradients()
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def _clip_grad_norm(self, model):
        """Clip each member's gradient by itself, so members stay independent; returns the total norm."""
        self._sync_gradients()
        self.accelerator.unscale_gradients()
        unwrapped = self.accelerator.unwrap_model(model)
        sq = 0.0
        for name in self.member_names:
            params = [p for n, p in unwrapped.named_parameters() if f".{name}." in n and p.grad is not None]
            sq += float(torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm)) ** 2
        return torch.tensor(math.sqrt(sq))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._member_loss_steps:
            for m, value in enumerate((self._member_loss / self._member_loss_steps).tolist()):
                logs[f"loss_{member_name(m)}"] = round(value, 4)
            self._member_loss.zero_()
            self._member_loss_steps = 0
        super().log(logs, *args, **kwargs)

    # ---- snapshot mode -------------------------------------------------------------------------

    def snapshot_batches(self, member: int, epoch: int) -> list[np.ndarray]:
        """The global batches (row positions) of member ``member``'s snapshot at the end of ``epoch``, in order.

        Rows sorted by length (longest first) are cut into batches of ``per_device_eval_batch_size *
        world_size``, so similar lengths share a batch; their order is ``default_rng([seed, member,
        epoch, 1]).permutation``, so each member's reference direction grows over another sequence
        and is not built from the longest rows first.
        """
        size = self.args.per_device_eval_batch_size * self.args.world_size
        if getattr(self, "_by_length", None) is None:  # computed once, kept as int32: 4 bytes a row
            order = np.argsort(-read_int_columns(self.train_dataset, ["length"])["length"], kind="stable")
            self._by_length = order.astype(np.int32) if len(order) < 2**31 else order
        order = self._by_length
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        return [batches[k] for k in np.random.default_rng([self.args.seed, member, epoch, 1]).permutation(len(batches))]

    def snapshot(self, epoch: int) -> None:
        """Record every example's norm, loss and cosine for every member at the current weights (epoch is 0-based).

        Member m visits `snapshot_batches` (process ``rank`` takes its slice of each), its reference
        direction starting from zero: each cosine is against the summed gradients of the batches m
        visited before, at the same weights, whatever the number of processes.
        """
        model = self.model
        was_training = model.training
        model.eval()  # no dropout: the norm at fixed weights
        unwrapped = self.accelerator.unwrap_model(model)
        world, rank = self.args.world_size, self.args.process_index
        directions = self.args.record_directions
        progress = tqdm(total=len(self.member_names) * len(self.train_dataset) // world,
                        desc=f"Snapshot epoch {epoch + 1}", disable=self.args.disable_tqdm)
        for m, name in enumerate(self.member_names):
            self._activate(name)
            self.recorder.reset_directions()
            params = [p for n, p in unwrapped.named_parameters() if f".{name}." in n]
            for global_batch in self.snapshot_batches(m, epoch):
                mine = np.array_split(global_batch, world)[rank]
                if len(mine):
                    chunk = self.train_dataset[mine.tolist()]
                    feats = [{"input_ids": i, "labels": l, "example_id": e}
                             for i, l, e in zip(chunk["input_ids"], chunk["labels"], chunk["example_id"])]
                    batch = self._prepare_inputs(pad_batch(feats, self.pad_token_id))
                    self.recorder.start(len(feats), self.args.device, member=name)
                    losses = self._member_forward(model, batch)
                    torch.autograd.grad(losses.sum(), params, allow_unused=True)
                    sq = self.recorder.stop()
                    self._store(batch["example_id"], m, epoch, sq.sqrt(), losses, self.recorder.cosines)
                    progress.update(len(feats))
                if directions:  # every process, its slice empty or not: the all-reduce is collective
                    self.recorder.commit(name, self._reduce)
        progress.close()
        self._activate(self.member_names)
        model.train(was_training)

    # ---- saving --------------------------------------------------------------------------------

    def save_record(self, output_dir: str | None = None) -> str:
        return self.record.save(output_dir or self.args.output_dir)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save every member as a PEFT adapter (``output_dir/member_m``), the record and the tokenizer."""
        output_dir = output_dir or self.args.output_dir
        if not self.is_world_process_zero():
            return
        os.makedirs(output_dir, exist_ok=True)
        unwrapped = self.accelerator.unwrap_model(self.model)
        unwrapped.save_pretrained(output_dir, selected_adapters=self.member_names)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        self.save_record(output_dir)
        with open(os.path.join(output_dir, "gradfilter_config.json"), "w") as f:
            json.dump(self.record.metadata, f, indent=2, default=str)
        if _internal_call and self.args.record_mode == "train" and self.args.record_directions:
            self._save_directions(output_dir)

    def _save_directions(self, output_dir: str) -> None:
        """The members' reference directions of the epoch in progress (`DIRECTIONS_NAME`), so a run
        resumed mid-epoch records the cosines an uninterrupted run would."""
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in self.recorder.direction_state().items()}
        save_file(state, os.path.join(output_dir, DIRECTIONS_NAME),
                  metadata={"epoch": json.dumps(self._direction_epoch)})

    def _save_checkpoint(self, model, trial):
        """Checkpoint = Trainer's (members, optimizer, scheduler, RNG, state) + the partial record."""
        self.gather_record()  # collective: every process takes part
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Restore every member's weights and the partial record (the Trainer restores the rest)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        unwrapped = self.accelerator.unwrap_model(model or self.model)
        for name in self.member_names:
            path = os.path.join(resume_from_checkpoint, name, "adapter_model.safetensors")
            if not os.path.exists(path):
                raise FileNotFoundError(f"Checkpoint {resume_from_checkpoint} has no adapter for {name}; "
                                        "it was not written by GradFilterTrainer with this num_members.")
            set_peft_model_state_dict(unwrapped, load_file(path), adapter_name=name)
        # One array at a time, mapped from the checkpoint, into the record in place (no second record);
        # a checkpoint without cosines (older versions) leaves them NaN.
        arrays = read_record_arrays(resume_from_checkpoint, ["row_hash", "norms", "losses", "cosines"])
        for name, array in arrays:
            if ((name == "row_hash" and not np.array_equal(array, self._local.row_hash))
                    or (name == "norms" and array.shape != self._local.norms.shape)):
                raise ValueError(f"The record in {resume_from_checkpoint} was made from another dataset or "
                                 "settings; use a fresh output_dir.")
            if name != "row_hash" and self.args.process_index == 0:  # the others start empty: the
                getattr(self._local, name)[:] = array  # next gather counts each row once
        directions = os.path.join(resume_from_checkpoint, DIRECTIONS_NAME)
        if os.path.exists(directions):  # every process: the references are the global ones
            from safetensors import safe_open

            self.recorder.load_direction_state(load_file(directions, device=str(self.args.device)))
            with safe_open(directions, framework="pt") as f:
                self._direction_epoch = json.loads(f.metadata()["epoch"])
        self._activate(self.member_names)

    def member_loss_table(self) -> np.ndarray:
        """``(M, E)`` mean recorded loss per member and epoch (NaN where nothing was recorded)."""
        with warnings.catch_warnings():  # all-NaN slices (nothing recorded) are expected here
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(self.record.losses, axis=0)
