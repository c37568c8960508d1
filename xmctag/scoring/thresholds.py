"""Calibrated score thresholds on the tagging side: reading them from a bundle and applying them to a ranking.

``calibration.npy`` (a bundle file named by the manifest's ``calibration`` section) holds float32 ``(L,)``, one
threshold per label in label-table order, each in [0, 1] or +inf (never kept). ``tag --calibrated`` keeps label l of
a product when its score is at least ``thresholds[l]``. Fitting them is ``xmctag.calibration``'s.
"""

from __future__ import annotations

import numpy as np

from xmctag.errors import UserError


def apply_thresholds(indices: np.ndarray, scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """``indices`` ``(n, k)`` with -1 where the label (-1: none already) scores below its threshold."""
    known = indices >= 0
    limit = thresholds[np.where(known, indices, 0)]
    return np.where(known & (scores >= limit), indices, -1)


def load_thresholds(bundle) -> np.ndarray:
    """The thresholds of a ``Bundle`` (``Bundle.calibration``); a ``UserError`` naming the command to run when the
    bundle has none."""
    thresholds = bundle.calibration()
    if thresholds is None:
        raise UserError(f"--calibrated: {bundle.path} has no calibration; run `xmctag calibrate {bundle.path} --dev "
                        "DEV.parquet --precision 0.9` first")
    return thresholds


def check_thresholds(thresholds: np.ndarray, n_labels: int) -> str | None:
    """What is wrong with a loaded ``calibration.npy`` (None: nothing): float32 ``(n_labels,)``, each value in
    [0, 1] or +inf."""
    if thresholds.dtype != np.float32 or thresholds.shape != (n_labels,):
        return f"{thresholds.dtype} {thresholds.shape}, expected float32 ({n_labels},)"
    finite = np.isfinite(thresholds)
    if not ((finite & (thresholds >= 0) & (thresholds <= 1)) | np.isposinf(thresholds)).all():
        return "a threshold outside [0, 1] that is not +inf"
    return None
