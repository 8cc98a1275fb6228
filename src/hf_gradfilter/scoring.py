"""G-SNR and its parts: pure functions over the ``(N, M, E)`` norm array (numpy only, no I/O).

Notation (METHOD.md), with ``n[i, m, e]`` example i's gradient norm for member m at epoch e
(1-based epochs in the arguments; the arrays are 0-based):

    G_e(i)   = (1/M) sum_m n[i, m, e]^2                 mean squared norm over members
    V_t(i)   = Var_m  n[i, m, t]^2                      population variance over members
    rel_drop = (G_s - G_t) / (G_s + eps)                relative gradient drop
    G-SNR    = rel_drop / (V_t + eps)                   the paper's score

and the paper's ablations: ``raw_drop = G_s - G_t`` and ``var_drop = (G_s - G_t) / (V_t + eps)``.
NaN norms (rows that were never trained) give NaN scores.
"""

from __future__ import annotations

import numpy as np

DEFAULT_EPS = 1e-8
SCORE_COLUMNS = ("gsnr", "grad_early", "grad_late", "rel_drop", "ens_var_late")


def _epoch(norms: np.ndarray, epoch: int, name: str) -> np.ndarray:
    if norms.ndim != 3:
        raise ValueError(f"norms must have shape (N, M, E), got {norms.shape}.")
    num_epochs = norms.shape[2]
    if not 1 <= epoch <= num_epochs:
        raise ValueError(
            f"{name}={epoch} is outside the {num_epochs} recorded epoch(s); use 1..{num_epochs} "
            "or train the proxy for more epochs."
        )
    return norms[:, :, epoch - 1].astype(np.float64)


def grad_energy(norms: np.ndarray, epoch: int) -> np.ndarray:
    """``G_e = mean_m n[:, m, e]^2``: ``(N, M, E) -> (N,)``."""
    return np.mean(_epoch(norms, epoch, "epoch") ** 2, axis=1)


def ensemble_variance(norms: np.ndarray, epoch: int) -> np.ndarray:
    """``V_t = Var_m n[:, m, t]^2`` (population variance, ddof=0): ``(N, M, E) -> (N,)``."""
    return np.var(_epoch(norms, epoch, "epoch") ** 2, axis=1)


def relative_drop(g_early: np.ndarray, g_late: np.ndarray, eps: float = DEFAULT_EPS) -> np.ndarray:
    """``(G_s - G_t) / (G_s + eps)``."""
    return (g_early - g_late) / (g_early + eps)


def gsnr(g_early: np.ndarray, g_late: np.ndarray, v_late: np.ndarray, eps: float = DEFAULT_EPS) -> np.ndarray:
    """``G-SNR = (G_s - G_t) / (G_s + eps) * 1 / (V_t + eps)``."""
    return relative_drop(g_early, g_late, eps) / (v_late + eps)


def score_parts(norms: np.ndarray, early_epoch: int = 1, late_epoch: int = 2,
                eps: float = DEFAULT_EPS) -> dict[str, np.ndarray]:
    """Every column `GSNRScorer` appends, as ``(N,)`` float64 arrays keyed by `SCORE_COLUMNS`."""
    if early_epoch > late_epoch:
        raise ValueError(f"early_epoch={early_epoch} comes after late_epoch={late_epoch}; swap them.")
    _epoch(norms, early_epoch, "early_epoch")
    _epoch(norms, late_epoch, "late_epoch")
    if eps < 0:
        raise ValueError(f"eps={eps} must be >= 0.")
    g_s, g_t = grad_energy(norms, early_epoch), grad_energy(norms, late_epoch)
    v_t = ensemble_variance(norms, late_epoch)
    return {
        "gsnr": gsnr(g_s, g_t, v_t, eps),
        "grad_early": g_s,
        "grad_late": g_t,
        "rel_drop": relative_drop(g_s, g_t, eps),
        "ens_var_late": v_t,
    }


def raw_drop(g_early: np.ndarray, g_late: np.ndarray) -> np.ndarray:
    """Ablation Alt 1: ``G_s - G_t``."""
    return g_early - g_late


def variance_normalised_drop(g_early: np.ndarray, g_late: np.ndarray, v_late: np.ndarray,
                             eps: float = DEFAULT_EPS) -> np.ndarray:
    """Ablation Alt 3: ``(G_s - G_t) / (V_t + eps)``."""
    return (g_early - g_late) / (v_late + eps)
