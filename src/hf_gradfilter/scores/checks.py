"""The failure signatures of METHOD.md, read off a gradient record (printed after scoring, listed in the report)."""

from __future__ import annotations

import warnings

import numpy as np

from .scoring import score_parts


def failure_signatures(record, early_epoch: int = 1, late_epoch: int = 2) -> list[str]:
    """The failure signatures of METHOD.md seen in a record, each with what to try."""
    parts = score_parts(record.norms, early_epoch, late_epoch)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        loss = np.nanmean(record.losses, axis=(0, 1))
        rose = float(np.nanmean(parts["rel_drop"] < 0))
        v_rel = float(np.nanmedian(parts["ens_var_late"] / np.maximum(parts["grad_late"] ** 2, 1e-30)))
    if loss[late_epoch - 1] >= loss[early_epoch - 1]:
        out.append(f"the proxy's mean loss did not fall ({loss[early_epoch - 1]:.4f} -> {loss[late_epoch - 1]:.4f}): "
                   "its scores mean little; raise --learning_rate or train more epochs.")
    if rose > 0.5:
        out.append(f"the gradient energy rose from epoch {early_epoch} to {late_epoch} for {rose:.0%} of rows, so "
                   "the drop in G-SNR is mostly negative and the paper's score ranks rows it has learned last; "
                   "the default --score_column fit_rank does not use the drop (docs/remedies.md).")
    if np.isfinite(v_rel) and v_rel < 1e-4:
        out.append("the members' late norms barely differ (ensemble variance collapsed): the uncertainty term "
                   "carries no signal; use more members or different seeds/data orders.")
    if np.isfinite(parts["gsnr"]).any() and np.nanmax(np.abs(parts["gsnr"])) < 1e-6:
        out.append("G-SNR is near zero for every row: check the proxy's loss and learning rate.")
    return out
