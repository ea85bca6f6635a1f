"""The layer weights of the latency model, fitted on whole-model measurements.

``latency(w) - latency(dense) ~ sum_l a_l (table_l(w) - table_l(dense))``: layers timed alone
miss how the whole graph runs (fusions, caches, threads), so each layer's table change gets a
weight. ``alpha`` is one shared weight (least squares through the dense point); the per-layer
weights are ``alpha`` plus a ridge regression of what ``alpha`` leaves unexplained, so the ridge
shrinks them towards ``alpha``, not towards 0. The strength is chosen by leave-one-out error
(scikit-learn's ``Ridge`` refitted without each measurement, the weights clipped as they are
used) over a scale-aware grid that ends in a strength so large it is ``alpha`` for every layer
("inf"). Not ``RidgeCV``'s closed-form leave-one-out: it cannot see the clipping, and with more
layers than measurements (mobilenet_v2: 52 layers, 40 measurements) it chose a near-zero
strength whose clipped weights missed random widths by 56% where the shared weight missed by 9%.
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
    from sklearn.linear_model import Ridge

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

    def weights_for(strength, rows):
        coef = Ridge(alpha=strength, fit_intercept=False).fit(X[rows], residual[rows]).coef_
        return np.clip(alpha + coef, 0.0, 5.0 * alpha)

    loo = {}
    for label, strength in zip(labels, strengths):
        errors = []
        for i in range(len(y)):
            rows = np.arange(len(y)) != i
            errors.append(abs(float(X[i] @ weights_for(strength, rows)) - y[i]))
        loo[label] = float(np.mean(errors))
    chosen = min(labels, key=lambda label: (loo[label], -labels.index(label)))  # ties: the stronger
    weights = weights_for(strengths[labels.index(chosen)], np.ones(len(y), dtype=bool))
    return {"alpha": alpha, "weights": [float(v) for v in weights], "ridge": chosen, "loo": loo}
