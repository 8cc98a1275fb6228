"""The float32 re-record: a member batch whose per-example gradients overflowed under an fp16 loss
scaler is recorded again, so the record still holds the batch's true values.

With ``--fp16`` the loss scaler's factor (65536 at first) can push a layer's output gradients past
float16's range; the scaler then skips the optimizer step, as in any fp16 training, and the
trainer calls `rerecord` for the batch's norms (and cosines and gradient sum, for the member's
reference direction). Without a loss scaler a non-finite norm is an error instead.
"""

from __future__ import annotations

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)


def rerecord(trainer, model, batch: dict, name: str, weight: torch.Tensor, scale: float,
             directions: bool) -> torch.Tensor:
    """The batch's norms (and cosines, batch gradient sum) again, from a float32 forward and a
    backward of the unscaled loss that leaves the parameters' gradients alone.

    ``trainer``: the `GradFilterTrainer`; ``name``: the active member; ``scale``: the factor each
    example's loss carries in the backward (no loss scale); ``directions``: the recorder keeps the
    member's reference direction. If a norm is still not finite, the error names the rows.
    """
    # A plain backward (reentrant checkpointing cannot take autograd.grad), its gradients put back.
    params = [p for p in trainer.accelerator.unwrap_model(model).parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    trainer.recorder.start(len(batch["input_ids"]), trainer.args.device, member=name if directions else None)
    losses = trainer._member_forward(model, batch, mixed_precision=False)
    ((losses * weight).sum() * scale).backward()
    norms = trainer.recorder.stop(grad_scale=scale).sqrt() / scale
    for p, grad in zip(params, saved):
        p.grad = grad
    bad = (weight > 0) & ~torch.isfinite(norms)
    if bad.any():
        trainer._fail("gradient norm (also in float32)", batch["example_id"][bad].tolist(), name,
                      "Lower the learning rate.")
    trainer.num_rerecorded_batches += 1
    logger.info(f"Gradients of a {name} batch overflowed at global step {trainer.state.global_step}; "
                "its norms were recorded again in float32.")
    return norms
