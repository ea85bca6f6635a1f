"""The layer weights of the latency model, fitted on whole-model measurements.

``latency(w) - latency(dense) ~ sum_l a_l (table_l(w) - table_l(dense))``: layers timed alone
miss how the whole graph runs (fusions, caches, threads), so each layer's table change gets a
weight. ``alpha`` is one shared weight (least squares through the dense point); the per-layer
weights are ``alpha`` plus a ridge regression of what ``alpha`` leaves unexplained, so the ridge
shrinks them towards ``alpha``, not towards 0. scikit-learn's ``RidgeCV`` picks the strength by
its efficient leave-one-out error, over a scale-aware grid that ends in a strength so large it
is ``alpha`` for every layer ("inf").
"""
from __future__ import annotations

import numpy as np

STRENGTHS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # times the features' mean square
INF = 1e9  # a strength this large leaves alpha for every layer
ALPHA_RANGE = (0.2, 5.0)  # a shared weight outside it is timing noise, not the backend: 1 is used


def fit_layer_weights(xs: list[list[float]], ys: list[float]) -> dict:
    """``{"alpha", "weights" (one per column of xs), "ridge" (the strength chosen, relative to the
    features' scale, or "inf"), "loo" (mean absolute leave-one-out error per strength, in y's unit)}``.
    Weights stay in [0, 5 alpha]."""
    from sklearn.linear_model import RidgeCV

    X, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    n = X.shape[1] if X.ndim == 2 else 0
    if len(y) == 0 or n == 0:
        return {"alpha": 1.0, "weights": [1.0] * n, "ridge": None, "loo": {}}
    s = X.sum(1)
    den = float(s @ s)
    alpha = float(s @ y) / den if den > 0 else 1.0
    alpha = alpha if ALPHA_RANGE[0] <= alpha <= ALPHA_RANGE[1] else 1.0
    if len(y) < 3:  # too few measurements to choose a strength: the shared weight
        return {"alpha": alpha, "weights": [alpha] * n, "ridge": "inf", "loo": {}}
    residual = y - alpha * s
    scale = float(np.trace(X.T @ X)) / n or 1.0
    labels = [f"{c:g}" for c in STRENGTHS] + ["inf"]
    strengths = [c * scale for c in STRENGTHS] + [INF * scale]
    ridge = RidgeCV(alphas=strengths, fit_intercept=False, store_cv_results=True).fit(X, residual)
    errors = np.sqrt(np.asarray(ridge.cv_results_).reshape(len(y), len(strengths)))  # leave-one-out |error|
    loo = {label: float(errors[:, k].mean()) for k, label in enumerate(labels)}
    chosen = labels[strengths.index(float(ridge.alpha_))]
    weights = np.clip(alpha + ridge.coef_, 0.0, 5.0 * alpha)
    return {"alpha": alpha, "weights": [float(v) for v in weights], "ridge": chosen, "loo": loo}
