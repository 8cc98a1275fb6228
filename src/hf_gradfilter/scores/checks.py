"""The failure signatures of docs/method.md, read off a gradient record (printed after scoring, listed in the report):
the learning check's warnings (`proxy.learning`) and G-SNR's own."""

from __future__ import annotations

import numpy as np

from ..proxy.learning import learning_check
from .formulas import score_parts


def failure_signatures(record, early_epoch: int = 1, late_epoch: int = 2) -> list[str]:
    """The failure signatures seen in a record, each with what to try."""
    out = list(learning_check(record, early_epoch, late_epoch).warnings)
    gsnr = score_parts(record.norms, early_epoch, late_epoch)["gsnr"]
    if np.isfinite(gsnr).any() and np.nanmax(np.abs(gsnr)) < 1e-6:
        out.append("G-SNR is near zero for every row: check the proxy's loss and learning rate.")
    return out
