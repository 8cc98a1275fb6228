"""The learning check: did the proxy ensemble learn enough for its scores to mean anything?

Every score reads training dynamics, so a proxy that barely moved scores rows by their state at
initialisation. `learning_check` reads a `GradientRecord` (``norms``, ``losses``: ``(N, M, E)``) and
reports, for the early epoch s and the late epoch t (1-based):

    loss_per_epoch[e] = mean_{i,m} loss[i, m, e]              mean response loss per epoch
    loss_drop         = (L_s - L_t) / L_s                     relative fall of that mean
    energy_fell       = share_i [ G_t(i) < G_s(i) ]           rows whose gradient energy fell,
                        G_e(i) = mean_m norms[i, m, e]^2
    member_spread     = median_i sqrt(Var_m n[i,m,t]^2) / G_t(i)
                        the members' disagreement on the late squared norm (coefficient of variation;
                        about 0 when the ensemble collapsed)

Thresholds (`LOSS_DROP_MIN`, `ENERGY_FELL_MIN`, `SPREAD_MIN`) and why they sit where they do are in
docs/method.md ("Did the proxy learn?"); each warning names the fix.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

LOSS_DROP_MIN = 0.03
"""Below a 3% fall of the mean response loss from epoch s to t the proxy "barely learned". On SmolLM2-135M
the paper's rate 5e-5 gave 1.0-1.5% on three pools of ~300 rows and no keep-score passed the rule of
docs/default_choice.md; 2e-4 (the default) gave 3.9-5.4% and the default score passed it; 1e-3 gave 8%."""
ENERGY_FELL_MIN = 0.5
"""Below half the rows with a falling gradient energy, the drop in G-SNR is mostly negative (LoRA's early
phase: B starts at 0, so every row's gradient grows with B whatever the row)."""
SPREAD_MIN = 0.01
"""Below a 1% coefficient of variation across members of the late squared norm, the members agree on every
row and the ensemble variance V_t carries no signal."""


@dataclass
class LearningCheck:
    """What `learning_check` measured, and the warnings it raised (empty: the proxy learned)."""

    loss_per_epoch: list[float]
    loss_drop: float
    energy_fell: float
    member_spread: float
    early_epoch: int
    late_epoch: int
    warnings: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """``"learned"``, ``"barely learned"`` or ``"did not learn"`` (from ``loss_drop`` alone)."""
        if not np.isfinite(self.loss_per_epoch).any():
            return "not recorded"
        if not np.isfinite(self.loss_drop) or self.loss_drop <= 0:
            return "did not learn"
        return "learned" if self.loss_drop >= LOSS_DROP_MIN else "barely learned"

    def to_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}

    def summary(self) -> str:
        """One line: the verdict and its three numbers (the dataset card's settings row)."""
        return summarize(self.to_dict())

    def lines(self) -> list[str]:
        """The check as printed by ``hf-gradfilter score`` and shown in the report."""
        losses = " -> ".join(f"{v:.4f}" for v in self.loss_per_epoch)
        return [f"Learning check: {self.verdict}. Mean response loss per epoch {losses} "
                f"({change(self.loss_drop)} from epoch {self.early_epoch} to {self.late_epoch}; a fall of at least "
                f"{LOSS_DROP_MIN:.0%} expected).",
                f"  gradient energy fell for {_share(self.energy_fell)} of rows; members' spread of the late squared "
                "norm "
                f"{self.member_spread:.3f} (coefficient of variation; below {SPREAD_MIN} = collapsed)."]


def learning_check(record, early_epoch: int = 1, late_epoch: int = 2,
                   learning_rate: float | None = None) -> LearningCheck:
    """Measure how much the proxy learned between ``early_epoch`` and ``late_epoch`` (1-based) and say what to do
    when it did not. ``learning_rate`` (the proxy's, when known) goes into the advice."""
    norms, losses = record.norms, record.losses  # (N, M, E); read an epoch at a time (they may be file-backed)
    epochs = norms.shape[2]
    if not 1 <= early_epoch <= late_epoch <= epochs:
        raise ValueError(f"early_epoch={early_epoch}, late_epoch={late_epoch}: need 1 <= s <= t <= {epochs} "
                         "(the recorded epochs).")
    s, t = early_epoch - 1, late_epoch - 1
    with warnings.catch_warnings():  # rows never recorded are NaN: expected
        warnings.simplefilter("ignore", RuntimeWarning)
        per_epoch = np.array([np.nanmean(np.asarray(losses[:, :, e], dtype=np.float64)) for e in range(epochs)])
        n_s, n_t = (np.asarray(norms[:, :, e], dtype=np.float64) for e in (s, t))
        g_s, g_t = np.mean(n_s ** 2, axis=1), np.mean(n_t ** 2, axis=1)
        v_t = np.var(n_t ** 2, axis=1)
        both = np.isfinite(g_s) & np.isfinite(g_t)
        fell = float(np.mean(g_t[both] < g_s[both])) if both.any() else float("nan")
        spread = float(np.nanmedian(np.sqrt(v_t) / np.maximum(g_t, 1e-30)))
    drop = float((per_epoch[s] - per_epoch[t]) / per_epoch[s]) if per_epoch[s] > 0 else float("nan")
    check = LearningCheck([float(v) for v in per_epoch], drop, fell, spread, early_epoch, late_epoch)
    rate = f" (now {learning_rate:g})" if learning_rate is not None else ""
    if not np.isfinite(per_epoch).any():  # record_mode="none", or nothing trained yet
        check.warnings = []
        return check
    if late_epoch == early_epoch:
        check.warnings.append(f"early_epoch = late_epoch = {late_epoch}: nothing to compare; record two epochs.")
    elif not np.isfinite(drop) or drop <= 0:
        check.warnings.append(
            f"the proxy did not learn: its mean response loss did not fall from epoch {early_epoch} to {late_epoch} "
            f"({per_epoch[s]:.4f} -> {per_epoch[t]:.4f}). Every score then ranks rows by the untrained model; "
            f"raise --learning_rate{rate} (e.g. 10x) or --num_train_epochs.")
    elif drop < LOSS_DROP_MIN:
        check.warnings.append(
            f"the proxy barely learned: its mean response loss fell {drop:.1%} from epoch {early_epoch} to "
            f"{late_epoch}, under {LOSS_DROP_MIN:.0%}. Scores that read a change between epochs (gsnr, rel_drop, "
            f"raw_drop, var_drop) are then mostly noise; raise --learning_rate{rate} (SmolLM2-135M: 2e-4 gave a 4-5% "
            "fall where 5e-5 gave 1%) or --num_train_epochs (docs/method.md).")
    if late_epoch > early_epoch and np.isfinite(fell) and fell < ENERGY_FELL_MIN:
        check.warnings.append(
            f"the gradient energy rose from epoch {early_epoch} to {late_epoch} for {1 - fell:.0%} of rows, so "
            "G-SNR's drop is negative for most rows and the paper's score ranks first the rows the members disagree "
            "on most (LoRA's early phase: B starts at 0 and every row's gradient grows with it). A higher rate or "
            "more epochs did not cure it on SmolLM2-135M (83-100% of rows rose, 5e-5 to 1e-3, 2-3 epochs); prefer a "
            "score that reads no drop, such as the default neg_energy_token (docs/method.md).")
    if norms.shape[1] > 1 and np.isfinite(spread) and spread < SPREAD_MIN:
        check.warnings.append(
            f"the members' late norms barely differ (spread {spread:.4f}, ensemble variance collapsed): the "
            "uncertainty term carries no signal; use more members or different seeds/data orders.")
    return check


def summarize(check: dict | None) -> str | None:
    """One line from a `LearningCheck.to_dict` (e.g. a record's ``metadata["learning_check"]``); None for None."""
    if not check:
        return None
    losses = " -> ".join(f"{v:.3f}" for v in check["loss_per_epoch"])
    return (f"{check['verdict']}: mean response loss {losses} ({change(check['loss_drop'])} from epoch "
            f"{check['early_epoch']} to {check['late_epoch']}), gradient energy fell for "
            f"{_share(check['energy_fell'])} of rows, members' spread {check['member_spread']:.3f}"
            + (f"; {len(check['warnings'])} warning(s)" if check.get("warnings") else ""))


def change(loss_drop: float) -> str:
    """``"fell 1.1%"`` / ``"rose 2.8%"`` for a relative drop of the mean loss."""
    if not np.isfinite(loss_drop):
        return "no change measured"
    return f"{'fell' if loss_drop > 0 else 'rose' if loss_drop < 0 else 'did not change:'} {abs(loss_drop):.1%}"


def _share(value: float) -> str:
    return f"{value:.0%}" if np.isfinite(value) else "an unmeasured share"
