"""Stacked members (``stack_members``): the M members' batches of a step as one batch of M x B rows,
each row through its own member's LoRA, one forward and one backward for the whole ensemble.

Every LoRA layer of the PEFT model computes, for rows b of member ``m(b)`` (one batched matmul each)::

    y_b = base(x_b) + scaling * x_b A_{m(b)}^T B_{m(b)}^T        A: (M, r, d_in), B: (M, d_out, r) stacked

(`stacked_lora`; PEFT's own mixed-adapter batches, ``adapter_names=``, refuse training mode). Members
share no parameter, so one backward of the sum of the members' losses gives each member's LoRA
exactly the gradient its own backward would, and each row's per-example gradient is its own
member's: the norm kernel runs on all rows at once (`LoraNormRecorder.add_stacked`). The
optimizer, scheduler and per-member clipping (`GradFilterTrainer._clip_grad_norm`) are the ones
the per-member path uses, on the same gradients.

What differs from the per-member path: the M batches are padded to the widest of them (more
padding than per-member length-grouped batches; the rows' results are the same), a step holds
M times the activations, and float sums run in another order (results agree to float rounding).
The same record needs the base model's dropout off (pretrained ``gpt2`` has 0.1): one stacked forward
draws other dropout masks than M separate ones, so with dropout on the two paths differ by the draws
(a warning says so). Not supported (refused by `GradFilterConfig`): fp16 (its overflow re-record is per member),
gradient checkpointing, LoRA dropout; and members of different ranks or LoRA variants.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .sampler import pad_batch

_DROPOUT_FIELDS = ("attn_pdrop", "resid_pdrop", "embd_pdrop", "attention_dropout", "hidden_dropout",
                   "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout")


def warn_base_dropout(model) -> None:
    """Warn when the base model drops out in training: stacked and per-member runs then draw other masks."""
    config = getattr(model, "config", None)
    active = {f: getattr(config, f) for f in _DROPOUT_FIELDS
              if isinstance(getattr(config, f, None), (int, float)) and getattr(config, f) > 0}
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()) or active:
        warnings.warn(f"stack_members with the base model's dropout on ({active or 'nn.Dropout modules'}): the "
                      "record and weights differ from the per-member path by the dropout draws. Set the model's "
                      "dropout to 0 (e.g. resid_pdrop=embd_pdrop=attn_pdrop=0 for GPT-2) for the same results.",
                      stacklevel=2)


def stacked_layers(model: nn.Module, names: list[str], recorder=None) -> list[tuple[nn.Module, tuple[int, int]]]:
    """PEFT LoRA layers that carry every member in ``names``, with the recorder's indices of their
    ``lora_A`` / ``lora_B`` matrices (``(-1, -1)`` without a recorder).

    Raises ValueError for what the stacked forward does not cover: a layer with only some members,
    members of different shapes, LoRA dropout, bias or variants (DoRA, ...).
    """
    layers = []
    for path, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict) or not any(n in lora_a for n in names):
            continue
        missing = [n for n in names if n not in lora_a]
        if missing:
            raise ValueError(f"{path} has LoRA for some members but not {missing}; stack_members needs every "
                             "member on the same layers (or use stack_members=False).")
        for n in names:
            a, b = lora_a[n], module.lora_B[n]
            if not isinstance(a, nn.Linear) or not isinstance(b, nn.Linear) or b.bias is not None:
                raise ValueError(f"{path}: stack_members covers plain Linear LoRA without bias; got "
                                 f"{type(a).__name__} / bias={b.bias is not None} for {n}.")
            if not isinstance(module.lora_dropout[n], nn.Identity):
                raise ValueError(f"{path}: stack_members needs lora_dropout=0 ({n} has dropout); "
                                 "use stack_members=False.")
            if n in getattr(module, "lora_variant", {}):
                raise ValueError(f"{path}: {n} is a LoRA variant (DoRA, ...); stack_members covers plain LoRA.")
            first = (lora_a[names[0]].weight.shape, module.lora_B[names[0]].weight.shape)
            if (a.weight.shape, b.weight.shape) != first:
                raise ValueError(f"{path}: {n}'s LoRA shape differs from {names[0]}'s; stack_members needs one "
                                 "rank and layout for all members.")
        slots = (-1, -1)
        if recorder is not None:
            mods = recorder.modules[names[0]]
            slots = (mods.index(lora_a[names[0]]), mods.index(module.lora_B[names[0]]))
        layers.append((module, slots))
    if not layers:
        raise ValueError(f"No LoRA layers carry the members {names}; check target_modules.")
    return layers


def _stacked_forward(layer, names, rows, slots, recorder, x, *args, **kwargs):
    """A PEFT LoRA Linear's forward for a stacked batch: row b through member ``names[rows[b]]``."""
    if x.dim() != 3 or x.shape[0] != rows.shape[0]:
        raise ValueError(f"A stacked LoRA layer got input of shape {tuple(x.shape)} for {rows.shape[0]} stacked rows.")
    result = layer.base_layer(x, *args, **kwargs)
    weight_a = torch.stack([layer.lora_A[n].weight for n in names])  # (M, r, d_in)
    weight_b = torch.stack([layer.lora_B[n].weight for n in names])  # (M, d_out, r)
    x = x.to(weight_a.dtype)  # as PEFT casts the input to the adapter's dtype
    hidden = torch.bmm(x, weight_a[rows].transpose(1, 2))  # (B, T, r)
    out = torch.bmm(hidden, weight_b[rows].transpose(1, 2))  # (B, T, d_out): lora_B's output
    if recorder is not None and recorder.recording and hidden.requires_grad:
        x_seen, hidden_seen = x.detach(), hidden.detach()
        hidden.register_hook(lambda grad: recorder.add_stacked(slots[0], x_seen, grad.detach()))
        out.register_hook(lambda grad: recorder.add_stacked(slots[1], hidden_seen, grad.detach()))
    scalings = [layer.scaling[n] for n in names]
    if len(set(scalings)) == 1:
        out = out * scalings[0]
    else:
        out = out * torch.tensor(scalings, device=out.device, dtype=out.dtype)[rows][:, None, None]
    return result + out.to(result.dtype)


@contextlib.contextmanager
def stacked_lora(model: nn.Module, names: list[str], rows: torch.Tensor, recorder=None):
    """Within the block, ``model``'s LoRA layers run row b through member ``names[rows[b]]`` (`_stacked_forward`),
    whatever adapters PEFT has active; ``recorder`` (a `LoraNormRecorder`) gets every row's per-example
    gradient parts when it is recording a stacked batch. Keep the block open until the backward is done."""
    layers = stacked_layers(model, names, recorder)
    for layer, slots in layers:
        layer.forward = functools.partial(_stacked_forward, layer, names, rows, slots, recorder)
    try:
        yield
    finally:
        for layer, _ in layers:
            del layer.forward


def stack_batches(batches: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The members' padded batches (`sampler.pad_batch`) as one: right-padded to the widest, rows in
    member order, with ``rows`` the ``(B,)`` index of each row's batch."""
    width = max(b["input_ids"].shape[1] for b in batches)
    pads = {"input_ids": pad_token_id, "attention_mask": 0, "labels": -100}
    out = {key: torch.cat([F.pad(b[key], (0, width - b[key].shape[1]), value=value) for b in batches])
           for key, value in pads.items()}
    for key in ("example_id", "weight"):
        out[key] = torch.cat([b[key] for b in batches])
    device = batches[0]["input_ids"].device
    out["rows"] = torch.cat([torch.full((len(b["input_ids"]),), m, dtype=torch.long, device=device)
                             for m, b in enumerate(batches)])
    return out


def stacked_training_step(trainer, model, inputs) -> torch.Tensor:
    """`GradFilterTrainer.training_step` with the members' batches as one (``stack_members``): the
    same losses, gradients, record and returned loss, from one forward and one backward."""
    model.train()
    inputs = trainer._prepare_inputs(inputs)
    args, names, recorder = trainer.args, trainer.member_names, trainer.recorder
    epoch, global_batch = int(inputs["epoch"]), int(inputs["global_batch"])
    record = args.record_mode == "train"
    directions = record and args.record_directions
    if directions and epoch != trainer._direction_epoch:  # a new epoch: S_m starts again from zero
        recorder.reset_directions()
        trainer._direction_epoch = epoch
    ga = trainer.current_gradient_accumulation_steps
    batch = stack_batches(inputs["members"], trainer.pad_token_id)
    rows, weight, ids = batch["rows"], batch["weight"], batch["example_id"]
    scale = args.world_size / (global_batch * ga)  # each loss_i's factor, as in the per-member path
    trainer._activate(names)  # every member trainable
    trainer._split_head()  # its one-time check runs a plain forward: before the layers are stacked
    unwrapped = trainer.accelerator.unwrap_model(model)
    with trainer.accelerator.no_sync(model), stacked_lora(unwrapped, names, rows, recorder):
        if record:
            recorder.start(len(rows), args.device, stacked=(names, rows))
        losses = trainer._member_forward(model, batch)
        trainer.accelerator.backward((losses * weight).sum() * scale)
    for m, name in enumerate(names):
        trainer._check_finite(losses[rows == m], ids[rows == m], name)
    if record:
        norms = recorder.stop(grad_scale=scale).sqrt() / scale
        for m, name in enumerate(names):
            keep = (rows == m) & (weight > 0)
            if not torch.isfinite(norms[keep]).all():
                trainer._fail("gradient norm", ids[keep & ~torch.isfinite(norms)].tolist(), name,
                              "Lower the learning rate.")
            cosines = None if recorder.cosines is None else recorder.cosines[keep]
            trainer._store(ids[keep], m, epoch, norms[keep], losses[keep], cosines)
            if directions:  # the batch joins member m's reference (summed over processes)
                recorder.commit(name, trainer._reduce)
    per_member = _per_member_mean(losses.detach() * weight, weight, rows, len(names))
    trainer._member_loss += per_member.cpu()
    trainer._member_loss_steps += 1
    return per_member.sum() / ga / len(names)


def _per_member_mean(values, weight, rows, num_members) -> torch.Tensor:
    """``(M,)`` sum of ``values`` over each member's rows / sum of their weights (at least 1)."""
    sums = torch.zeros(num_members, dtype=values.dtype, device=values.device).index_add(0, rows, values)
    counts = torch.zeros(num_members, dtype=weight.dtype, device=weight.device).index_add(0, rows, weight)
    return sums / counts.clamp(min=1)


def record_snapshot_stacked(trainer, epoch: int) -> None:
    """`snapshot.record_snapshot` with the members' k-th snapshot batches as one batch (``stack_members``):
    each member visits its own batches in its own order, its reference starting from zero."""
    model = trainer.model
    was_training = model.training
    model.eval()
    unwrapped = trainer.accelerator.unwrap_model(model)
    args, names, recorder = trainer.args, trainer.member_names, trainer.recorder
    world, rank = args.world_size, args.process_index
    trainer._activate(names)
    trainer._split_head()
    recorder.reset_directions()
    params = [p for p in unwrapped.parameters() if p.requires_grad]
    orders = [trainer.snapshot_batches(m, epoch) for m in range(len(names))]  # equally many batches each
    for step in range(len(orders[0])):
        mine = [np.array_split(order[step], world)[rank] for order in orders]
        present = [m for m in range(len(names)) if len(mine[m])]
        if present:
            parts = []
            for m in present:
                chunk = trainer.train_dataset[mine[m].tolist()]
                parts.append(pad_batch([{"input_ids": i, "labels": lab, "example_id": e} for i, lab, e in
                                        zip(chunk["input_ids"], chunk["labels"], chunk["example_id"])],
                                       trainer.pad_token_id))
            batch = trainer._prepare_inputs(stack_batches(parts, trainer.pad_token_id))
            rows = torch.tensor(present, device=args.device)[batch["rows"]]  # index into names
            with stacked_lora(unwrapped, names, rows, recorder):
                recorder.start(len(rows), args.device, stacked=(names, rows))
                losses = trainer._member_forward(model, batch)
                torch.autograd.grad(losses.sum(), params, allow_unused=True)
            sq = recorder.stop()
            for m in present:
                sel = rows == m
                cosines = None if recorder.cosines is None else recorder.cosines[sel]
                trainer._store(batch["example_id"][sel], m, epoch, sq[sel].sqrt(), losses[sel], cosines)
        if args.record_directions:  # every process and member, rows or not: the all-reduce is collective
            for name in names:
                recorder.commit(name, trainer._reduce)
    model.train(was_training)
