"""Exact per-example gradient norms of LoRA matrices, for a whole batch at once.

For a linear map ``y = x W^T`` applied at every position t of example b, the gradient of the loss
with respect to ``W`` splits into per-example parts

    dW_b = sum_t  g_{b,t} a_{b,t}^T          a: (B, T, d_in) input, g: (B, T, d_out) = dL/dy

so one batched contraction gives every ``||dW_b||_F^2`` from the activations the forward pass
already made and the output gradients the backward pass already computes (the Opacus way). No
second backward, no per-example loop, and nothing per example outlives the layer's backward.

`sq_norms` is the pure kernel; `LoraNormRecorder` only captures tensors with hooks on the
``lora_A[member]`` / ``lora_B[member]`` modules of a PEFT model and adds the kernel's output up.
"""

from __future__ import annotations

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

        recorder = LoraNormRecorder(peft_model, ["member_0", "member_1"])
        with recorder.recording(batch_size):
            loss.backward()
        sq = recorder.result  # (B,) squared norm of d loss / d (LoRA params of the active member)

    Hooks are cheap no-ops outside `recording`, so evaluation and plain training are untouched.
    """

    def __init__(self, model: nn.Module, adapter_names: list[str]):
        self._sq: torch.Tensor | None = None
        self.result: torch.Tensor | None = None
        self._handles = []
        self.modules = {name: lora_modules(model, name) for name in adapter_names}
        for mods in self.modules.values():
            for module in mods:
                self._handles.append(module.register_forward_hook(self._forward_hook))

    def _forward_hook(self, module, inputs, output):
        if self._sq is None or not output.requires_grad:
            return
        activations = inputs[0].detach()

        def backward_hook(grad_output):
            self._sq += sq_norms(activations, grad_output.detach())

        output.register_hook(backward_hook)

    def start(self, batch_size: int, device) -> None:
        """Begin recording a batch; hooks fire from the next forward on."""
        self._sq = torch.zeros(batch_size, dtype=torch.float32, device=device)
        self.result = None

    def stop(self) -> torch.Tensor:
        """End recording; returns the ``(B,)`` squared norms added up since `start`."""
        self.result, self._sq = self._sq, None
        return self.result

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
