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

The class reads as the `Trainer` hooks it overrides (``get_train_dataloader``, ``training_step``,
``_clip_grad_norm``, ``log``, ``save_model``, ``_save_checkpoint``, ``_load_from_checkpoint``); each
concern with state of its own has a module beside it: the members and their loss (`model`), the
rows trained on (`rows`), the data orders (`sampler`), the snapshot pass (`snapshot`), the merge of
the processes' records (`merge`), the float32 re-record after an fp16 overflow (`rerecord`), the
checkpoint's extra state (`checkpoint`) and the members' batches run as one (`stacked`, ``stack_members``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings

import numpy as np
import torch
from peft import PeftModel
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer
from transformers.utils import logging

from ..data.columns import read_int_columns
from ..data.formatting import tokenize_dataset
from .checkpoint import load_directions, load_members, restore_record, save_directions, saved_rerecord_count
from .config import GradFilterConfig
from .learning import learning_check
from .merge import average_gradients, merge_records
from .model import build_ensemble, head_splits, member_name, per_example_loss, response_loss
from .norms import LoraNormRecorder
from .record import GradientRecord
from .rerecord import rerecord
from .rows import select_positions, survey_rows
from .sampler import EpochLoader, MemberCollator, MemberRows, MemberSampler
from .sketch import final_sketches, member_sketcher, sketch_layout, store_sketches
from .snapshot import SnapshotCallback, length_order, record_snapshot, snapshot_batches
from .stacked import record_snapshot_stacked, stacked_training_step, warn_base_dropout

logger = logging.get_logger(__name__)


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

    After `train()`, ``trainer.record`` holds the `GradientRecord` and ``trainer.learning_check`` the
    `proxy.learning.LearningCheck` (also in ``record.metadata["learning_check"]``; its warnings are logged):
    how much the proxy learned, and what to change when it did not. `save_model()` writes every
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
        ids, hashes, trainable, self.data_stats = survey_rows(tokenized, args.max_length, args.output_dir)

        if not isinstance(model, PeftModel):
            model = build_ensemble(model, args)
        self.member_names = [member_name(m) for m in range(args.num_members)]
        missing = [n for n in self.member_names if n not in model.peft_config]
        if missing:
            raise ValueError(f"The PeftModel lacks adapters {missing}; adapters must be named member_0 ... ")

        callbacks = list(callbacks or [])
        if args.record_mode == "snapshot":
            callbacks.append(SnapshotCallback(self))
        train_rows = select_positions(tokenized, trainable)
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
        if args.stack_members:
            warn_base_dropout(self.model)  # once, not in every stacked step
        self._direction_epoch = None  # the epoch the references belong to
        self.recorder.sketcher = member_sketcher(self.recorder, args)  # None unless sketch_dim (`sketch`)
        sketched = self.recorder.sketcher and args.sketch_epochs  # 1-based epochs, in the record's slot order
        self._sketch_slot = {e - 1: i for i, e in enumerate(sketched or [])}
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
                **({"sketch": {**self.recorder.sketcher.metadata(sketched), "storage": args.sketch_storage,
                               "dtype": args.sketch_dtype}} if sketched else {}),
            },
            sketch_shape=(len(sketched), args.sketch_dim) if sketched else None,
            **sketch_layout(args),
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
        return EpochLoader(MemberRows(self.train_dataset), batch_sampler=self.sampler, collate_fn=self.data_collator,
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
        count = self._count_rerecorded()
        if count:
            logger.warning(f"{count} member batch(es) overflowed (fp16 loss scale) and were recorded "
                           "again in float32; the loss scaler skips the optimizer step of such a batch.")
        self.gather_record()
        self.record.sketches = final_sketches(self.record.sketches, self.args.sketch_dtype, self.args.output_dir)
        self.learning_check = check = learning_check(self.record, self.args.early_epoch, self.args.late_epoch,
                                                     learning_rate=self.args.learning_rate)
        self.record.metadata["learning_check"] = check.to_dict()
        if self.is_world_process_zero():
            for line in check.lines():
                logger.info(line)
            for warning in check.warnings:
                logger.warning(f"Learning check: {warning}")
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
        if self.args.stack_members:  # the members' batches as one (`stacked`)
            return stacked_training_step(self, model, inputs)
        model.train()
        inputs = self._prepare_inputs(inputs)
        epoch, global_batch = int(inputs["epoch"]), int(inputs["global_batch"])
        record = self.args.record_mode == "train"
        directions = record and self.args.record_directions
        self._sketch_epoch(epoch)
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
                    self._store(batch["example_id"][keep], m, epoch, norms[keep], losses[keep], cosines, keep)
                    if directions:  # the batch joins member m's reference (summed over processes)
                        self.recorder.commit(name, self._reduce)
                member_loss = (losses.detach() * weight).sum() / weight.sum().clamp(min=1)
                total += member_loss / ga
                self._member_loss[m] += member_loss.cpu()
        self._member_loss_steps += 1
        return total / len(self.member_names)

    def _count_rerecorded(self) -> int:
        """The batches recorded again so far over all processes (a collective call), kept in the record's metadata."""
        count = torch.tensor(self.num_rerecorded_batches, device=self.args.device)
        if self.args.world_size > 1:
            torch.distributed.all_reduce(count)
        if count.item():
            self._local.metadata["num_rerecorded_batches"] = int(count.item())
        return int(count.item())

    def _rerecord(self, model, batch, name, weight, scale, directions) -> torch.Tensor:
        """The batch's norms again in float32, after an fp16 overflow (`rerecord.rerecord`)."""
        return rerecord(self, model, batch, name, weight, scale, directions)

    def _loss_scaled(self) -> bool:
        """Whether backward passes run under a loss scaler (``--fp16``), whose overflows `rerecord` handles."""
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

    def _store(self, example_ids, m, epoch, norms, losses, cosines=None, keep=None) -> None:
        """Put a member batch's values in the record (``keep``: the batch's rows stored, for the sketches)."""
        rows = example_ids.cpu().numpy()
        sketches = self.recorder.sketches  # (B, d) in a sketched epoch, else None
        if sketches is not None:
            sketches = (sketches if keep is None else sketches[keep]).detach().cpu().numpy()
            store_sketches(self._local.sketches, rows, m, self._sketch_slot[epoch], sketches, self.args.num_members)
        self._local.norms[rows, m, epoch] = norms.detach().float().cpu().numpy()
        self._local.losses[rows, m, epoch] = losses.detach().float().cpu().numpy()
        if cosines is not None:
            self._local.cosines[rows, m, epoch] = cosines.detach().float().cpu().numpy()

    def _sketch_epoch(self, epoch: int) -> None:
        """Sketch the batches recorded next when ``epoch`` (0-based) is one of ``sketch_epochs``."""
        if self.recorder.sketcher is not None:
            self.recorder.sketcher.enabled = epoch in self._sketch_slot

    # ---- distributed ---------------------------------------------------------------------------

    def _sync_gradients(self) -> None:
        """Average the LoRA gradients over processes (one all-reduce per optimizer step)."""
        if self.args.world_size > 1:
            average_gradients(self.accelerator.unwrap_model(self.model).parameters(), self.args.world_size)

    @property
    def _reduce(self):
        """`LoraNormRecorder.commit`'s ``all_reduce``: a sum over processes, or None with one process."""
        return torch.distributed.all_reduce if self.args.world_size > 1 else None

    def gather_record(self) -> GradientRecord:
        """Combine every process's recorded rows into ``self.record`` (a collective call).

        The merge (`merge.merge_records`) runs in blocks of rows into a second file-backed record,
        allocated once, so no process holds a whole record in memory. Raises if any (example,
        member, epoch) was recorded by more than one process.
        """
        if self.args.world_size <= 1:
            self.record = self._local
            return self.record
        local = self._local
        if self._merged is None:
            sketch_shape = None if local.sketches is None else local.sketches.shape[2:]
            self._merged = GradientRecord.empty(local.example_id, local.row_hash, local.num_members, local.num_epochs,
                                                directory=self.args.output_dir, copy=False, sketch_shape=sketch_shape,
                                                **sketch_layout(self.args))
            self._merged.metadata = local.metadata  # one dict: what the trainer adds later shows in both
        merge_records(local, self._merged, self.args.device)
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
        """The global batches (row positions) of member ``member``'s snapshot at the end of ``epoch``, in order
        (`snapshot.snapshot_batches`; the length order is computed once)."""
        if getattr(self, "_by_length", None) is None:
            self._by_length = length_order(self.train_dataset)
        size = self.args.per_device_eval_batch_size * self.args.world_size
        return snapshot_batches(self._by_length, size, self.args.seed, member, epoch)

    def snapshot(self, epoch: int) -> None:
        """Record every example at the current weights (epoch is 0-based): `snapshot.record_snapshot`
        (`stacked.record_snapshot_stacked` with ``stack_members``)."""
        (record_snapshot_stacked if self.args.stack_members else record_snapshot)(self, epoch)

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
            save_directions(self.recorder, self._direction_epoch, output_dir)

    def _save_checkpoint(self, model, trial):
        """Checkpoint = Trainer's (members, optimizer, scheduler, RNG, state) + the partial record."""
        self._count_rerecorded()  # collective, as is the merge: every process takes part
        self.gather_record()
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Restore every member's weights, the partial record and the reference directions (the Trainer
        restores the rest; `checkpoint`)."""
        load_members(self.accelerator.unwrap_model(model or self.model), self.member_names, resume_from_checkpoint)
        restore_record(self._local, resume_from_checkpoint, into=self.args.process_index == 0)
        if self.args.process_index == 0:  # the count is summed over processes when saved next
            self.num_rerecorded_batches = saved_rerecord_count(resume_from_checkpoint)
        epoch = load_directions(self.recorder, resume_from_checkpoint, self.args.device)
        if epoch is not None:
            self._direction_epoch = epoch
        self._activate(self.member_names)

    def member_loss_table(self) -> np.ndarray:
        """``(M, E)`` mean recorded loss per member and epoch (NaN where nothing was recorded)."""
        with warnings.catch_warnings():  # all-NaN slices (nothing recorded) are expected here
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(self.record.losses, axis=0)
