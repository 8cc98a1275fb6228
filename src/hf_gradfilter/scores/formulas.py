"""G-SNR and its parts: pure functions over the ``(N, M, E)`` norm array (numpy only, no I/O).

Notation (docs/method.md), with ``n[i, m, e]`` example i's gradient norm for member m at epoch e
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
DEFAULT_SCORE = "neg_energy_token"
"""The keep-score that selection uses unless told otherwise: ``neg_energy_token`` (``-G_t * T``, `dynamics`),
chosen by the rule docs/default_choice.md wrote down before its runs on three real SmolLM2 pools. No candidate
beat random in every family of bad rows there, so the rule fell back to the score that does least harm (the
best worst-family AUROC); the earlier default `fit_rank`, chosen on toy models, ranked a real proxy's own answers
first. The paper's ``gsnr`` stays available by name."""
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


# ---- baselines over the record (RecordScorer) ---------------------------------------------------

RECORD_COLUMNS = ("raw_drop", "var_drop", "loss_late", "neg_loss_late", "neg_grad_late", "neg_var_late",
                  "cos_late", "gsnr_dir")


def mean_loss(losses: np.ndarray, epoch: int) -> np.ndarray:
    """``L_e = mean_m loss[:, m, e]``, the members' mean recorded response loss: ``(N, M, E) -> (N,)``."""
    return np.mean(_epoch(losses, epoch, "epoch"), axis=1)


def mean_cosine(cosines: np.ndarray, epoch: int) -> np.ndarray:
    """``C_e = mean_m cos[:, m, e]`` over the members with a value: ``(N, M, E) -> (N,)``.

    ``cos[i, m, e]`` is `GradientRecord.cosines`: the cosine between example i's gradient and member
    m's mean gradient of the epoch so far. NaN only where no member has a cosine.
    """
    c = _epoch(cosines, epoch, "epoch")
    count = np.sum(~np.isnan(c), axis=1)
    total = np.nansum(c, axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def gsnr_direction(gsnr_score: np.ndarray, cos_late: np.ndarray) -> np.ndarray:
    """Direction-aware G-SNR: ``G-SNR * (1 + sign(G-SNR) * C_t)``, all ``(N,)``.

    ``C_t`` in [-1, 1] is `mean_cosine` at the late epoch. A positive G-SNR is scaled by ``1 + C_t``
    (up to 2x when the example's gradient points along the members' mean descent direction, down
    to 0 when it points against it); a negative G-SNR by ``1 - C_t`` (pushed towards 0 by
    agreement, doubled by disagreement). So the sign of G-SNR is kept, the score never decreases
    as ``C_t`` grows, and ``C_t = 0`` (no information) leaves G-SNR as it is.
    """
    return gsnr_score * (1.0 + np.sign(gsnr_score) * cos_late)


def record_parts(norms: np.ndarray, losses: np.ndarray, early_epoch: int = 1, late_epoch: int = 2,
                 eps: float = DEFAULT_EPS, cosines: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The ablations and record baselines, ``(N,)`` float64 arrays keyed by `RECORD_COLUMNS` and ``fit_rank``::

        raw_drop      = G_s - G_t                  Alt 1
        var_drop      = (G_s - G_t) / (V_t + eps)  Alt 3
        loss_late     = L_t                        members' mean loss at the late epoch (lower = learned)
        neg_loss_late = -L_t                       keep-score: low proxy loss
        neg_grad_late = -G_t                       keep-score: low late gradient energy
        neg_var_late  = -V_t                       keep-score: low late ensemble variance
        cos_late      = C_t                        members' mean cosine with their mean gradient (`mean_cosine`)
        gsnr_dir      = G-SNR * (1 + sign(G-SNR) * C_t)   direction-aware G-SNR (`gsnr_direction`)
        fit_rank      = (r(-G_t) + r(-L_t)) / 2    the default keep-score (`fit_rank`, docs/remedies.md;
                                                   a `GSNRScorer` column)

    (Alt 2, ``rel_drop``, and G-SNR itself are in `score_parts`.) ``norms``, ``losses`` and ``cosines``
    are ``(N, M, E)``; ``cosines=None`` (a record without directions) gives NaN direction columns.
    """
    if norms.shape != losses.shape:
        raise ValueError(f"norms {norms.shape} and losses {losses.shape} must have the same (N, M, E) shape.")
    if cosines is None:
        cosines = np.full(norms.shape, np.nan)
    if cosines.shape != norms.shape:
        raise ValueError(f"cosines {cosines.shape} must have the (N, M, E) shape of norms {norms.shape}.")
    parts = score_parts(norms, early_epoch, late_epoch, eps)  # validates the epochs and eps
    g_s, g_t, v_t = parts["grad_early"], parts["grad_late"], parts["ens_var_late"]
    l_t = mean_loss(losses, late_epoch)
    c_t = mean_cosine(cosines, late_epoch)
    return {
        "fit_rank": fit_rank(g_t, l_t),
        "raw_drop": raw_drop(g_s, g_t),
        "var_drop": variance_normalised_drop(g_s, g_t, v_t, eps),
        "loss_late": l_t,
        "neg_loss_late": -l_t,
        "neg_grad_late": -g_t,
        "neg_var_late": -v_t,
        "cos_late": c_t,
        "gsnr_dir": gsnr_direction(parts["gsnr"], c_t),
    }


def uniform_hash(ids, seed: int = 0) -> np.ndarray:
    """A uniform ``[0, 1)`` float per id that depends only on ``(seed, id)``: ``(N,) int -> (N,) float64``.

    ``u = (splitmix64(splitmix64(seed) XOR id) >> 11) / 2^53`` (SplitMix64, Steele et al. 2014), so
    a row's value is the same whatever the batching or the other rows.
    """
    ids = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    key = _splitmix64(np.array([seed & (2**64 - 1)], dtype=np.uint64))
    return (_splitmix64(ids ^ key) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


# ---- remedy: rank mix of low late energy and low late loss (docs/remedies.md) ----------------------

def average_rank(x: np.ndarray) -> np.ndarray:
    """Ranks of ``x`` scaled to ``[0, 1]`` (0 = smallest), ties averaged, NaN kept as NaN: ``(N,) -> (N,)``.

    ``r_i = (rank_i - 1) / (K - 1)`` over the K finite values (1-based `metrics.average_ranks`, a tie
    shares the mean of its ranks); a single finite value gets 0.5.
    """
    from .metrics import average_ranks

    x = np.asarray(x, dtype=np.float64)
    out = np.full(x.shape, np.nan)
    ok = np.isfinite(x)
    k = int(ok.sum())
    if k:
        out[ok] = (average_ranks(x[ok]) - 1) / (k - 1) if k > 1 else 0.5
    return out


def fit_rank(g_late: np.ndarray, loss_late: np.ndarray) -> np.ndarray:
    """Keep-score ``fit_rank = (r(-G_t) + r(-L_t)) / 2`` in ``[0, 1]``: rows the proxy fits well rank high.

    ``G_t`` is the members' mean squared gradient norm at the late epoch (`grad_energy`), ``L_t`` their
    mean response loss there (`mean_loss`), ``r`` is `average_rank` (ties averaged, over the rows where
    both are finite). Both ``(N,)``; returns ``(N,)``, NaN where either input is NaN.

    Unlike the paper's G-SNR it reads no epoch-to-epoch drop (that drop was mostly noise and of
    either sign in docs/remedies.md) and no division, so its ranking does not flip with the sign of
    anything; it is scale-free (ranks), so the adapter's norm growth cannot dominate it.
    """
    g_late = np.asarray(g_late, dtype=np.float64)
    loss_late = np.asarray(loss_late, dtype=np.float64)
    if g_late.shape != loss_late.shape or g_late.ndim != 1:
        raise ValueError(f"g_late {g_late.shape} and loss_late {loss_late.shape} must be the same (N,) shape.")
    both = np.isfinite(g_late) & np.isfinite(loss_late)
    score = np.full(g_late.shape, np.nan)
    score[both] = (average_rank(-g_late[both]) + average_rank(-loss_late[both])) / 2.0
    return score
