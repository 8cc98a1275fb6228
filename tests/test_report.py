"""The report's histogram axes (`run.report.display_scale`): each column on a scale that shows its spread."""

from __future__ import annotations

import numpy as np

from hf_gradfilter.run.report import display_scale


def test_wide_positive_columns_are_shown_as_log10():
    transform, label = display_scale(np.array([0.01, 1.0, 50.0]), "grad_late")
    assert label == "log10 grad_late" and np.allclose(transform(np.array([0.01, 100.0])), [-2, 2])


def test_the_score_column_is_not_logged_when_positive():
    transform, label = display_scale(np.array([0.01, 1.0, 50.0]), "gsnr", allow_log=False)
    assert label == "gsnr" and transform(3.0) == 3.0


def test_wide_negative_columns_keep_their_order_on_a_log_axis():
    values = np.array([-3000.0, -50.0, -2.0, -0.5])
    transform, label = display_scale(values, "neg_energy_token", allow_log=False)
    shown = transform(values)
    assert label == "-log10(-neg_energy_token)" and np.all(np.diff(shown) > 0)
    assert np.allclose(shown, -np.log10(-values))


def test_narrow_columns_are_shown_as_they_are_and_heavy_signed_tails_are_compressed():
    transform, label = display_scale(np.array([-2.0, -1.0, -0.5]), "neg_grad_late")
    assert label == "neg_grad_late" and transform(-1.5) == -1.5
    values = np.array([-1e6, -1.0, 0.5, 1.0, 2.0])
    transform, label = display_scale(values, "gsnr")
    assert label.startswith("sign·log10(1+|gsnr|/") and np.all(np.diff(transform(values)) > 0)
