"""Exact per-example gradient norms of LoRA matrices, for a whole batch at once.

For a linear map ``y = x W^T`` applied at every position t of example b, the gradient of the loss
with respect to ``W`` splits into per-example parts

    dW_b = sum_t  g_{b,t} a_{b,t}^T          a: (B, T, d_in) input, g: (B, T, d_out) = dL/dy

so one batched contraction gives every ``||dW_b||_F^2`` from the activations the forward pass
already made and the output gradients the backward pass already computes (the Opacus way). No
second backward, no per-example loop, and nothing per example outlives the layer's backward.

`sq_norms` is the pure kernel; `LoraNormRecorder` only captures tensors with hooks on the
``lora_A[member]`` / ``lora_B[member]`` modules of a PEFT model and adds the kernel's output up.

Directions: with a fixed matrix ``V`` of ``W``'s shape, ``<dW_b, V>_F = sum_t g_{b,t}^T V a_{b,t}``
(`grad_dots`), so the same captured tensors also give every example's dot product with a reference
direction, and the batch's gradient sum ``sum_b dW_b`` that moves the reference on. The recorder
keeps one reference per member (the sum of the per-example gradients it saw earlier in the epoch)
and reports each example's cosine with it.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


def sq_norms(activations: torch.Tensor, grad_outputs: torch.Tensor) -> torch.Tensor:
    """Per-example squared Frobenius norm of ``sum_t g[b, t] a[b, t]^T``.

    Args:
        activations: ``(B, T, d_in)`` inputs of the linear layer.
        grad_outputs: ``(B, T, d_out)`` gradients of the loss with respect to its outputs.

    Returns:
        ``(B,)`` float32 tensor. Materialises ``(B, d_out, d_in)`` when that is cheaper than the
        Gram form ``sum_{t,t'} (a_t . a_t') (g_t . g_t')`` (always, for LoRA's rank-r side).
    """
    a, g = activations.float(), grad_outputs.float()
    if a.dim() == 2:  # (B, d): one position per example
        a, g = a.unsqueeze(1), g.unsqueeze(1)
    _, t, d_in = a.shape
    d_out = g.shape[-1]
    if d_in * d_out <= t * (d_in + d_out):
        per_example = torch.bmm(g.transpose(1, 2), a)  # (B, d_out, d_in)
        return per_example.pow(2).sum(dim=(1, 2))
    gram_a = torch.bmm(a, a.transpose(1, 2))  # (B, T, T)
    gram_g = torch.bmm(g, g.transpose(1, 2))
    return (gram_a * gram_g).sum(dim=(1, 2))


def grad_dots(activations: torch.Tensor, grad_outputs: torch.Tensor,
              reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example ``<dW_b, V>_F`` and the batch sum ``sum_b dW_b``, with ``dW_b = sum_t g[b, t] a[b, t]^T``.

    Args:
        activations: ``(B, T, d_in)`` (or ``(B, d_in)``) inputs of the linear layer.
        grad_outputs: ``(B, T, d_out)`` (or ``(B, d_out)``) gradients of the loss with respect to its outputs.
        reference: ``(d_out, d_in)`` the matrix ``V`` (laid out like ``nn.Linear.weight``).

    Returns:
        ``(B,)`` float32 dots ``sum_t g[b, t] . (V a[b, t])`` and the ``(d_out, d_in)`` float32 sum of the
        per-example gradients. Cost: two ``B*T*d_in*d_out`` contractions (one forward matmul of the layer
        each); no per-example gradient is materialised.
    """
    a, g = activations.float(), grad_outputs.float()
    if a.dim() == 2:
        a, g = a.unsqueeze(1), g.unsqueeze(1)
    dots = (torch.matmul(a, reference.float().T) * g).sum(dim=(1, 2))  # (B, T, d_out) -> (B,)
    total = g.reshape(-1, g.shape[-1]).T @ a.reshape(-1, a.shape[-1])  # (d_out, d_in)
    return dots, total


def lora_modules(model: nn.Module, adapter_name: str) -> list[nn.Module]:
    """The ``lora_A`` and ``lora_B`` linear modules of one adapter, in model order.

    Raises ValueError for LoRA variants whose per-example norm this kernel does not cover.
    """
    modules = []
    for name, module in model.named_modules():
        if getattr(module, "lora_embedding_A", None) is not None and adapter_name in module.lora_embedding_A:
            raise ValueError(f"LoRA on embeddings ({name}) is not supported; drop it from target_modules.")
        if getattr(module, "lora_magnitude_vector", None) and adapter_name in module.lora_magnitude_vector:
            raise ValueError("DoRA adapters are not supported for per-example norms; set use_dora=False.")
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and adapter_name in lora_a:
            for sub in (lora_a[adapter_name], module.lora_B[adapter_name]):
                if not isinstance(sub, nn.Linear):
                    raise ValueError(f"{name}: LoRA layer type {type(sub).__name__} is not supported (Linear only).")
                if sub.bias is not None:
                    raise ValueError(f"{name}: LoRA with bias is not supported; set lora_bias=False.")
                modules.append(sub)
    if not modules:
        raise ValueError(f"No LoRA layers found for adapter {adapter_name!r}; check target_modules.")
    return modules


class LoraNormRecorder:
    """Adds up per-example squared gradient norms over every LoRA matrix of the active member.

    Usage::

        recorder = LoraNormRecorder(peft_model, ["member_0", "member_1"], directions=True)
        recorder.start(batch_size, device, member="member_0")
        loss.backward()
        sq = recorder.stop()  # (B,) squared norm of d loss_b / d (LoRA params of the active member)
        recorder.cosines      # (B,) cosine with member_0's reference direction
        recorder.commit("member_0")  # the batch joins member_0's reference

    Hooks are cheap no-ops outside `start` ... `stop`, so evaluation and plain training are untouched.

    Directions (``directions=True`` and ``start(..., member=name)``): member m keeps a reference
    ``S_m``, one float32 matrix per LoRA matrix (one gradient-sized vector per member in all). For a
    batch whose backward saw ``c * loss_b`` per example (``c = grad_scale``, the same for the batch)::

        cosines[b] = <g_b, S_m> / (||g_b|| ||S_m||)      NaN where either norm is 0
        S_m += (sum_b g_b) / c                           at `commit`, after the batch

    with ``g_b`` example b's gradient over all of m's LoRA parameters (the scale ``c`` cancels in the
    cosine). `reset_directions` zeroes the references (the trainer does so at each epoch start), so
    ``S_m`` is the sum (a multiple of the mean) of the per-example gradients of the batches committed
    earlier in the epoch. Extra cost per LoRA matrix: two contractions the size of its forward matmul;
    extra memory: the references and one batch's gradient sum (one member's LoRA size).

    Sketches: with ``recorder.sketcher`` set (a `sketch.LoraSketcher` over one member's matrices; the
    matrix index k is the same in every member) and enabled, `stop` also sets ``sketches`` ``(B, d)``:
    each example's gradient projected (`sketch.lora_sketch`), divided by ``grad_scale``.
    """

    def __init__(self, model: nn.Module, adapter_names: list[str], directions: bool = False):
        self._sq: torch.Tensor | None = None
        self._dots: torch.Tensor | None = None
        self._member: str | None = None
        self.result: torch.Tensor | None = None
        self.cosines: torch.Tensor | None = None
        self.sketcher = None  # a `sketch.LoraSketcher`, set by the trainer when sketches are on
        self.sketches: torch.Tensor | None = None
        self.directions = directions
        self._handles = []
        self.modules = {name: lora_modules(model, name) for name in adapter_names}
        self._slot = {}  # module -> (member, position in self.modules[member])
        self.reference: dict[str, list[torch.Tensor]] = {}
        self._batch_sum: dict[int, torch.Tensor] = {}
        self._pending: dict[str, dict[int, torch.Tensor]] = {}  # member -> its stopped batch's sums, to commit
        self._stacked: tuple[list[str], torch.Tensor] | None = None  # (members, (B,) member index of each row)
        for name, mods in self.modules.items():
            for k, module in enumerate(mods):
                self._slot[module] = (name, k)
                self._handles.append(module.register_forward_hook(self._forward_hook))
        self.reset_directions()

    def _forward_hook(self, module, inputs, output):
        if self._sq is None or not output.requires_grad:
            return
        activations = inputs[0].detach()
        name, k = self._slot[module]

        def backward_hook(grad_output):
            grad_output = grad_output.detach()
            self._sq += sq_norms(activations, grad_output)
            if self.sketcher is not None:
                self.sketcher.add(k, activations, grad_output)
            if self._dots is not None and name == self._member:
                dots, total = grad_dots(activations, grad_output, self.reference[name][k])
                self._dots += dots
                self._batch_sum[k] = self._batch_sum[k] + total if k in self._batch_sum else total

        output.register_hook(backward_hook)

    def start(self, batch_size: int, device, member: str | None = None,
              stacked: tuple[list[str], torch.Tensor] | None = None) -> None:
        """Begin recording a batch; hooks fire from the next forward on.

        ``member``: also record each example's cosine with that member's reference (needs ``directions``).
        ``stacked``: ``(members, rows)``, a batch of several members' rows at once (`stacked.stacked_lora`
        forwards it and calls `add_stacked`): row b belongs to ``members[rows[b]]``; cosines are
        recorded when ``directions`` is on.
        """
        self._sq = torch.zeros(batch_size, dtype=torch.float32, device=device)
        self.result, self.cosines, self.sketches = None, None, None
        if self.sketcher is not None:
            self.sketcher.start(batch_size, device)
        self._pending = {}  # an earlier batch left uncommitted (one recorded again) never reaches a reference
        self._stacked = stacked
        if (member is not None or stacked is not None) and self.directions:
            self._member = member
            self._dots = torch.zeros(batch_size, dtype=torch.float32, device=device)
            self._batch_sum = {}

    def stop(self, grad_scale: float = 1.0) -> torch.Tensor:
        """End recording; returns the ``(B,)`` squared norms added up since `start`.

        With a member's directions on, also sets ``cosines`` ``(B,)`` and holds the batch's gradient
        sum, divided by ``grad_scale`` (the factor each example's loss carried in the backward), for `commit`.
        """
        self.result, self._sq = self._sq, None
        if self.sketcher is not None:
            self.sketches = self.sketcher.stop(grad_scale)
        if self._dots is not None:
            names, rows = self._stacked or ([self._member], torch.zeros_like(self._dots, dtype=torch.long))
            ref_sq = torch.stack([sum(r.double().pow(2).sum() for r in self.reference[n]) for n in names])
            denom = (self.result.double() * ref_sq[rows]).sqrt()
            self.cosines = torch.where(denom > 0, self._dots.double() / denom, torch.nan).float()
            sums = self._batch_sum if self._stacked else {k: total[None] for k, total in self._batch_sum.items()}
            self._pending = {n: {k: total[i] / grad_scale for k, total in sums.items()} for i, n in enumerate(names)}
            self._dots, self._member, self._batch_sum = None, None, {}
        self._stacked = None
        return self.result

    @property
    def recording(self) -> bool:
        """Whether a batch is being recorded (between `start` and `stop`)."""
        return self._sq is not None

    def add_stacked(self, k: int, activations: torch.Tensor, grad_outputs: torch.Tensor) -> None:
        """Add LoRA matrix ``k``'s part of a stacked batch (`start(..., stacked=...)`): each row's gradient
        ``dW_b = sum_t g[b, t] a[b, t]^T`` is its own member's, so the kernel runs on all rows at once.

        ``activations``: ``(B, T, d_in)``; ``grad_outputs``: ``(B, T, d_out)``. Computes the ``(B, d_out, d_in)``
        per-row gradients (LoRA's rank-r side makes them small), then their squared norms, their dots with
        the row's member's reference and each member's batch sum.
        """
        if self._sq is None or self._stacked is None:
            return
        names, rows = self._stacked
        per_row = torch.bmm(grad_outputs.float().transpose(1, 2), activations.float())  # (B, d_out, d_in)
        self._sq += per_row.pow(2).sum(dim=(1, 2))
        if self._dots is not None:
            refs = torch.stack([self.reference[n][k] for n in names])  # (M, d_out, d_in)
            self._dots += (per_row * refs[rows]).sum(dim=(1, 2))
            total = torch.zeros_like(refs).index_add_(0, rows, per_row)
            self._batch_sum[k] = self._batch_sum[k] + total if k in self._batch_sum else total

    def commit(self, member: str, all_reduce=None) -> bool:
        """Add ``member``'s last stopped batch's gradient sum to its reference; returns whether it did.

        ``all_reduce`` (e.g. ``torch.distributed.all_reduce``: sums a flat tensor in place over
        processes) makes every process's reference the global one; then every process must call
        `commit` for the same members in the same order, whether it recorded a batch or not.

        A sum that is not finite (an fp16 overflow) is left out with a RuntimeWarning: inf in a
        reference would make every later cosine of the member NaN until the epoch ends. Checked after
        the all-reduce, so every process decides alike.
        """
        refs = self.reference[member]
        pending = self._pending.pop(member, {})
        if all_reduce is not None:
            flat = torch.cat([pending.get(k, torch.zeros_like(ref)).reshape(-1) for k, ref in enumerate(refs)])
            all_reduce(flat)
            pending = dict(enumerate(torch.split(flat, [ref.numel() for ref in refs])))
        if pending and not torch.stack([torch.isfinite(t).all() for t in pending.values()]).all():  # one sync
            warnings.warn(f"{member}'s gradient sum is not finite (an overflow); this batch is left out of its "
                          "reference direction.", RuntimeWarning, stacklevel=2)
            return False
        for k, total in pending.items():
            refs[k] += total.view_as(refs[k])
        return True

    def reset_directions(self) -> None:
        """Zero every member's reference direction (and drop uncommitted batch sums)."""
        self.reference = {name: [torch.zeros_like(m.weight, dtype=torch.float32) for m in mods]
                          for name, mods in self.modules.items()}
        self._pending = {}

    def direction_state(self) -> dict[str, torch.Tensor]:
        """The references as ``{"<member>.<k>": (d_out, d_in) tensor}`` (for checkpoints)."""
        return {f"{name}.{k}": ref for name, refs in self.reference.items() for k, ref in enumerate(refs)}

    def load_direction_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `direction_state`; raises if the members or LoRA shapes differ."""
        for name, refs in self.reference.items():
            for k, ref in enumerate(refs):
                value = state.get(f"{name}.{k}")
                if value is None or value.shape != ref.shape:
                    raise ValueError(f"Saved direction state does not fit {name} LoRA matrix {k} ({tuple(ref.shape)}).")
                ref.copy_(value)
        self._pending = {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
