"""Gradient sketches: a seeded ``d``-dimensional random projection of each example's full LoRA gradient,
computed in batch from the tensors the norm hooks already capture, never building a per-example gradient.

For LoRA matrix k (``(d_out, d_in)``; PEFT's ``lora_A`` and ``lora_B`` are two such matrices per
adapted layer, each with its own per-example gradient) example b's gradient is
``G_bk = sum_t g_{b,t} a_{b,t}^T``. With two matrices per k, ``P_k`` ``(d_out, d1)`` and ``Q_k``
``(d_in, d2)``, ``d1 * d2 = d``, the sketch is

    s_b = sum_k vec(P_k^T G_bk Q_k) = sum_k sum_t (P_k^T g_{b,t}) (x) (Q_k^T a_{b,t})        (d,)

summed over matrices: two thin matmuls per matrix and one ``(d1, T) x (T, d2)`` product per example
(`lora_sketch`), so the cost grows with ``d_out * d1 + d_in * d2`` per token, not ``d_out * d_in``.
Which ``P_k, Q_k`` (`matrix_factors`): LoRA matrices have a rank side (``lora_A``: ``d_out = r``;
``lora_B``: ``d_in = r``). When r divides d and ``r <= sqrt(d)``, that side is kept exactly (identity,
``d1 = r``) and the other is a dense Gaussian with ``d / r`` columns, entries ``N(0, r/d)``: each of
the r rows (or columns) of ``G`` gets a Johnson-Lindenstrauss projection. Otherwise both sides are
Gaussian, ``d1 ~ d2 ~ sqrt(d)`` (`sketch_factors`), entries ``N(0, 1/d1)`` and ``N(0, 1/d2)`` (Kronecker).

Why inner products are kept: ``E[P P^T] = I`` and ``E[Q Q^T] = I`` (trivially for an identity), with
``P, Q`` independent, so ``E <P^T X Q, P^T Y Q>_F = <X, Y>_F``; projections of different matrices are
independent with mean 0, so cross terms vanish and ``E <s_b, s_c> = sum_k <G_bk, G_ck> = <g_b, g_c>``
over all LoRA parameters (unbiased for every pair). The noise, for one matrix ``X`` with
``rho = ||X X^T||_F^2 / ||X||_F^4`` (between 1/rank and 1; LoRA's rank r caps the rank, so ``rho >= 1/r``)
(`relative_variance`):

    Var ||P^T X Q||_F^2 / ||X||_F^4 = 2 rho r / d                              (rank side exact)
                                    = 2/d + 2 rho (1/d1 + 1/d2 + 1/d)          (Kronecker)

(conditioning on ``P``: a Gaussian quadratic form in ``Q``, then a Wishart second moment in ``P``);
a dense Gaussian projection of the whole gradient has ``2/d``. The rank-side form is within a factor
``rho r`` (at most r) of it; the Kronecker one is about ``4 rho / sqrt(d)``. Summing K independently
projected matrices does *not* divide it by K: the cross terms ``<s_k, s_j>`` have mean 0 but variance of
order ``|X_k|^2 |X_j|^2 r / d``, so the whole sketch's relative variance stays of order ``1/d`` or more
(the measured cosine error, 0.025 at d = 1024, is about ``1/sqrt(d)``).

Projections are drawn per matrix from ``numpy.random.default_rng([seed, k])`` (float32) and shared by
all members (member m's matrix k and member m''s get the same ``P_k, Q_k``), so sketches of different
members, runs and datasets with the same seed, ``d`` and LoRA layout are comparable and can be
averaged. Memory: ``4 * (d_out * d1 + d_in * d2)`` bytes per LoRA matrix on the device.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .record import file_array

PROJECTION = "gaussian_rank_side_exact"  # recorded in the record's metadata (`matrix_factors`)


def sketch_factors(dim: int) -> tuple[int, int]:
    """``(d1, d2)`` with ``d1 * d2 = dim``: ``d1`` the largest divisor at most ``sqrt(dim)``.

    Raises ValueError when ``d2 > 4 * d1`` (a lopsided split has a larger variance, see the module
    docstring): use a power of 2 such as 256, 512, 1024 or 2048.
    """
    d1 = max(k for k in range(1, math.isqrt(dim) + 1) if dim % k == 0) if dim >= 1 else 0
    if dim < 4 or dim // d1 > 4 * d1:
        raise ValueError(f"sketch_dim={dim} does not split into d1 x d2 with d2 <= 4 d1; use a power of 2 "
                         "such as 256, 512, 1024 or 2048 (or 0 for no sketches).")
    return d1, dim // d1


def matrix_factors(d_out: int, d_in: int, dim: int) -> tuple[int, int, str | None]:
    """``(d1, d2, exact)`` of the projection of a ``(d_out, d_in)`` matrix into ``dim = d1 * d2``. A side of size
    r at most ``sqrt(dim)`` that divides ``dim`` (LoRA's rank side) is kept exactly: ``exact="out"``
    (``d1 = d_out``) or ``"in"`` (``d2 = d_in``), the other side getting ``dim / r`` columns; otherwise
    ``exact=None`` and `sketch_factors`."""
    root, _ = sketch_factors(dim)
    if d_out <= root and dim % d_out == 0:
        return d_out, dim // d_out, "out"
    if d_in <= root and dim % d_in == 0:
        return dim // d_in, d_in, "in"
    return (*sketch_factors(dim), None)


def relative_variance(d_out: int, d_in: int, dim: int, rho: float) -> float:
    """``Var ||P^T X Q||_F^2 / ||X||_F^4`` for a ``(d_out, d_in)`` matrix X with ``rho = ||X X^T||_F^2 / ||X||_F^4``
    (see the module docstring)."""
    d1, d2, exact = matrix_factors(d_out, d_in, dim)
    if exact is not None:
        return 2 * rho / (d2 if exact == "out" else d1)
    return 2 / dim + 2 * rho * (1 / d1 + 1 / d2 + 1 / dim)


def projections(shapes: list[tuple[int, int]], dim: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``(P_k, Q_k)`` of every matrix of ``shapes`` (``(d_out, d_in)`` each), float32, ``(d_out, d1)`` and
    ``(d_in, d2)`` (`matrix_factors`): an identity on an exact side, else a Gaussian with variance one over its
    number of columns, from ``default_rng([seed, k])``."""
    out = []
    for k, (d_out, d_in) in enumerate(shapes):
        rng = np.random.default_rng([seed, k])
        d1, d2, exact = matrix_factors(d_out, d_in, dim)
        p = (np.eye(d_out, dtype=np.float32) if exact == "out"
             else rng.standard_normal((d_out, d1), dtype=np.float32) / np.float32(math.sqrt(d1)))
        q = (np.eye(d_in, dtype=np.float32) if exact == "in"
             else rng.standard_normal((d_in, d2), dtype=np.float32) / np.float32(math.sqrt(d2)))
        out.append((torch.from_numpy(p), torch.from_numpy(q)))
    return out


def lora_sketch(activations: torch.Tensor, grad_outputs: torch.Tensor, p: torch.Tensor,
                q: torch.Tensor) -> torch.Tensor:
    """Per-example ``vec(P^T G_b Q)`` with ``G_b = sum_t g[b, t] a[b, t]^T``, without building ``G_b``.

    Args:
        activations: ``(B, T, d_in)`` (or ``(B, d_in)``) inputs of the linear layer.
        grad_outputs: ``(B, T, d_out)`` (or ``(B, d_out)``) gradients of the loss with respect to its outputs.
        p: ``(d_out, d1)``; q: ``(d_in, d2)``.

    Returns:
        ``(B, d1 * d2)`` float32, row-major ``(d1, d2)`` blocks: ``sum_t (P^T g_t) (Q^T a_t)^T``.
    """
    a, g = activations.float(), grad_outputs.float()
    if a.dim() == 2:
        a, g = a.unsqueeze(1), g.unsqueeze(1)
    left = torch.matmul(g, p)  # (B, T, d1)
    right = torch.matmul(a, q)  # (B, T, d2)
    return torch.bmm(left.transpose(1, 2), right).reshape(a.shape[0], -1)


class LoraSketcher:
    """Adds up one batch's sketches over the LoRA matrices of the active member (`LoraNormRecorder` calls
    `add` from its backward hook with the matrix's index k, shared by all members).

    ``enabled`` says whether batches are sketched (the trainer turns it on in the sketched epochs);
    after `stop`, the ``(B, d)`` sketches of the batch, divided by the loss factor of the backward.
    """

    def __init__(self, modules: list[nn.Module], dim: int, seed: int):
        self.dim, self.seed = dim, seed
        self._cpu = projections([tuple(m.weight.shape) for m in modules], dim, seed)
        self._on_device: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self.enabled = False
        self._sum: torch.Tensor | None = None

    def start(self, batch_size: int, device) -> None:
        self._sum = torch.zeros(batch_size, self.dim, dtype=torch.float32, device=device) if self.enabled else None

    def add(self, k: int, activations: torch.Tensor, grad_outputs: torch.Tensor) -> None:
        if self._sum is None:
            return
        key = (k, activations.device)
        if key not in self._on_device:
            self._on_device[key] = tuple(t.to(activations.device) for t in self._cpu[k])
        self._sum += lora_sketch(activations, grad_outputs, *self._on_device[key])

    def stop(self, grad_scale: float = 1.0) -> torch.Tensor | None:
        """The batch's ``(B, d)`` sketches of ``d loss_b / d LoRA`` (None when not enabled)."""
        result, self._sum = self._sum, None
        return None if result is None else result / grad_scale

    def metadata(self, epochs: list[int]) -> dict:
        """What a record needs to say how its sketches were made (``epochs``: 1-based, in storage order)."""
        return {"dim": self.dim, "seed": self.seed, "projection": PROJECTION,
                "epochs": list(epochs), "matrices": len(self._cpu)}


def member_sketcher(recorder, args) -> LoraSketcher | None:
    """The `LoraSketcher` for ``recorder`` (a `LoraNormRecorder`) under ``args`` (a `GradFilterConfig`), or None
    when ``args.sketch_dim`` is 0. Every member must have the same LoRA matrices (the projections are shared)."""
    if not args.sketch_dim:
        return None
    layouts = {name: [tuple(m.weight.shape) for m in mods] for name, mods in recorder.modules.items()}
    first = next(iter(layouts.values()))
    odd = [name for name, shapes in layouts.items() if shapes != first]
    if odd:
        raise ValueError(f"Sketches need every member to have the same LoRA matrices; {odd} differ from the first "
                         "member's. Build the members with one LoRA config, or set sketch_dim=0.")
    return LoraSketcher(next(iter(recorder.modules.values())), args.sketch_dim, args.sketch_seed)


def sketch_layout(args) -> dict:
    """`GradientRecord.empty`'s ``sketch_members`` (M, or 1 for ``sketch_storage="mean"``) and ``sketch_dtype`` of
    the record's sketch array while training under ``args`` (a `GradFilterConfig`): a member mean is summed in
    float32, whatever its final dtype (`final_sketches`)."""
    mean = args.sketch_storage == "mean"
    half = args.sketch_dtype == "float16" and not mean
    return {"sketch_members": 1 if mean else args.num_members, "sketch_dtype": np.float16 if half else np.float32}


def store_sketches(array: np.ndarray, rows: np.ndarray, member: int, slot: int, values: np.ndarray,
                   num_members: int) -> None:
    """Put member ``member``'s ``(B, d)`` sketches of ``rows`` in the record's ``array`` ``(N, M or 1, E_s, d)``:
    at the member, or with one member axis (``sketch_storage="mean"``) added into it as ``values / M`` (every
    member records every row once per sketched epoch, so the sum ends as the mean; a row no member recorded
    stays NaN)."""
    if array.shape[1] == 1 and num_members > 1:
        now = array[rows, 0, slot]
        array[rows, 0, slot] = np.where(np.isnan(now), 0, now) + values / np.float32(num_members)
        return
    if array.dtype == np.float16:
        values = _to_float16(values)
    array[rows, member, slot] = values


def _to_float16(values: np.ndarray) -> np.ndarray:
    out = values.astype(np.float16)
    if np.isinf(out).any() and not np.isinf(values).any():
        raise FloatingPointError(f"A gradient sketch value ({np.abs(values).max():.3g}) is beyond float16's range "
                                 "(65504): use sketch_dtype='float32'.")
    return out


def final_sketches(array: np.ndarray | None, dtype: str, directory: str | None = None, block: int = 65536):
    """``array`` in ``dtype`` (``"float16"``: a new array, file-backed in ``directory`` like the record's, copied in
    blocks of rows; ``array`` itself when it has that dtype already)."""
    if array is None or array.dtype == np.dtype(dtype):
        return array
    out = file_array(array.shape, np.dtype(dtype), np.nan, directory)
    for i in range(0, len(array), block):
        out[i:i + block] = _to_float16(np.asarray(array[i:i + block]))
    return out
