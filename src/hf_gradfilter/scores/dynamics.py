"""Keep-scores from the data-selection literature, read off the same record: pure functions over ``(N, M, E)``
losses / norms and ``(N,)`` columns (numpy only), and `DynamicsScorer`, their `Dataset.map` callable.

Notation as in `scoring` (1-based epochs s < t; arrays 0-based). ``L[i, m, e]`` is example i's mean response
loss for member m at epoch e (`GradientRecord.losses`), ``L_e = mean_m L[:, m, e]``, ``L_0`` the *frozen
base's* response loss (the proxy without its members: the ``base_loss`` column of `BaseLossScorer`), ``T`` the
response length in tokens (``response_length``), ``r`` `formulas.average_rank` in [0, 1]. Higher = kept::

    ambiguity        = std_{m,e} exp(-L[i,m,e])       Dataset Cartography's variability (Swayamdipta et al.
                                                      2020): rows the ensemble is unsure about across members
                                                      and epochs; "ambiguous" rows helped most there
    confidence       = mean_{m,e} exp(-L[i,m,e])      Cartography's confidence (easy rows first)
    mid_loss         = -|r(L_t) - 1/2|                the middle of the proxy-loss range (Marion et al. 2023:
                                                      both tails pruned: boilerplate/loops and garbled text)
    mid_loss_energy  = (mid(L_t) + mid(G_t)) / 2      the middle of both loss and gradient energy
    mid_base_loss    = -|r(L_0) - 1/2|                Marion et al.'s rule with the frozen base as reference
                                                      model (no proxy training needed: the cheap control)
    reducible_loss   = L_0 - L_t                      RHO-LOSS / RHO-1's excess loss with the base as the
                                                      current model and the trained proxy as the reference:
                                                      rows the pool-trained ensemble learned, that the base did
                                                      not already know (Mindermann et al. 2022)
    least_learned    = -(P_0 - P_t) / P_0             minus Mekala et al. 2024's learning percentage after one
                     = -(1 - exp(L_t - L_0))          epoch, with perplexities P = exp(L): the least-learned
                                                      rows first (in train mode the loss recorded at epoch t
                                                      is after t - 1 passes: with s = 1, t = 2, after the
                                                      first epoch, their P_1)
    neg_energy_token = -G_t * T                       low late gradient energy, length-normalised: with a
                                                      mean-over-tokens loss, noise in G falls like 1/T, so raw
                                                      energy favours long rows (LESS normalises gradients)

A column that needs ``base_loss`` or ``response_length`` is NaN when the rows lack it.
"""

from __future__ import annotations

import numpy as np

from .formulas import _epoch, average_rank, grad_energy, mean_loss

DYNAMICS_COLUMNS = ("ambiguity", "confidence", "mid_loss", "mid_loss_energy", "mid_base_loss", "reducible_loss",
                    "least_learned", "neg_energy_token")


def _recorded(losses: np.ndarray) -> np.ndarray:
    """``exp(-L)`` over the epochs where anything was recorded, ``(N, M, E')``."""
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 3:
        raise ValueError(f"losses must have shape (N, M, E), got {losses.shape}.")
    kept = ~np.all(np.isnan(losses), axis=(0, 1))
    return np.exp(-losses[:, :, kept])


def confidence(losses: np.ndarray) -> np.ndarray:
    """``mean_{m,e} exp(-L[i,m,e])`` (mean over members and recorded epochs): ``(N, M, E) -> (N,)``."""
    p = _recorded(losses)
    return p.reshape(len(p), -1).mean(axis=1)


def ambiguity(losses: np.ndarray) -> np.ndarray:
    """Cartography variability ``std_{m,e} exp(-L[i,m,e])`` (population std over members and recorded
    epochs): ``(N, M, E) -> (N,)``."""
    p = _recorded(losses)
    return p.reshape(len(p), -1).std(axis=1)


def middle(values: np.ndarray) -> np.ndarray:
    """``-|r(x) - 1/2|``: the middle of the range first, both tails last: ``(N,) -> (N,)`` in ``[-1/2, 0]``."""
    return -np.abs(average_rank(values) - 0.5)


def reducible_loss(base_loss: np.ndarray, loss_late: np.ndarray) -> np.ndarray:
    """``L_0 - L_t``, both ``(N,)``."""
    return np.asarray(base_loss, dtype=np.float64) - np.asarray(loss_late, dtype=np.float64)


def learning_percentage(base_loss: np.ndarray, loss_after: np.ndarray) -> np.ndarray:
    """Mekala et al.'s learning percentage ``(P_0 - P_1) / P_0 = 1 - exp(L_1 - L_0)`` with perplexities
    ``P = exp(L)``: the share of the base perplexity that training removed. Both ``(N,)``."""
    return 1.0 - np.exp(np.asarray(loss_after, dtype=np.float64) - np.asarray(base_loss, dtype=np.float64))


def energy_per_token(g_late: np.ndarray, length: np.ndarray) -> np.ndarray:
    """``G_t * T``, both ``(N,)``; NaN where ``T`` is not positive."""
    length = np.asarray(length, dtype=np.float64)
    return np.where(length > 0, np.asarray(g_late, dtype=np.float64) * length, np.nan)


def dynamics_parts(norms: np.ndarray, losses: np.ndarray, early_epoch: int = 1, late_epoch: int = 2,
                   base_loss: np.ndarray | None = None, length: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every `DYNAMICS_COLUMNS` keep-score as a ``(N,)`` float64 array (formulas in the module docstring).
    ``base_loss`` / ``length`` ``(N,)`` or None (their columns are then NaN)."""
    if norms.shape != losses.shape:
        raise ValueError(f"norms {norms.shape} and losses {losses.shape} must have the same (N, M, E) shape.")
    _epoch(losses, early_epoch, "early_epoch")
    n = norms.shape[0]
    nan = np.full(n, np.nan)
    l_t = mean_loss(losses, late_epoch)
    g_t = grad_energy(norms, late_epoch)
    base = nan if base_loss is None else np.asarray(base_loss, dtype=np.float64)
    length = nan if length is None else np.asarray(length, dtype=np.float64)
    for name, col in (("base_loss", base), ("length", length)):
        if col.shape != (n,):
            raise ValueError(f"{name} has shape {col.shape}; the record has {n} rows.")
    return {
        "ambiguity": ambiguity(losses),
        "confidence": confidence(losses),
        "mid_loss": middle(l_t),
        "mid_loss_energy": (middle(l_t) + middle(g_t)) / 2,
        "mid_base_loss": middle(base) if np.isfinite(base).any() else nan,
        "reducible_loss": reducible_loss(base, l_t),
        "least_learned": -learning_percentage(base, l_t),
        "neg_energy_token": -energy_per_token(g_t, length),
    }
