"""Power-function EMA profiles (EDM2, Karras et al. 2024, section 3 and appendix C), with time in images.

A profile of relative width ``sigma_rel`` averages the weights seen up to time t (images) with
density p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]; its standard deviation is
sigma_rel * t, which fixes gamma:

    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))                         (EDM2 eq. 3)

Tracked by updates at times t_1 < t_2 < ... (images after each optimizer step), the EMA uses
beta_k = (t_{k-1} / t_k)^(gamma + 1) = (1 - batch / t_k)^(gamma + 1); the products telescope,
so the weights after update k enter the average at time T with exactly

    w_k(T) = (t_k / T)^(gamma + 1) - (t_{k-1} / T)^(gamma + 1)                     (t_k <= T)

whatever the batch size, world size, accumulation or spacing of the updates. Post-hoc
reconstruction finds coefficients x for stored snapshots (profiles i at times T_i) so that
sum_i x_i w(gamma_i, T_i) is the least-squares closest to the wanted w(gamma_r, T_r), over these
exact per-update weights (not their continuous approximation). Pure math: numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# sigma_rel(gamma) peaks at gamma = (sqrt(5) - 3) / 2 (where g^2 + 3g + 1 = 0): no profile is wider.
_GAMMA_WIDEST = (math.sqrt(5.0) - 3.0) / 2.0
SIGMA_REL_WIDEST = math.sqrt((_GAMMA_WIDEST + 1) / ((_GAMMA_WIDEST + 2) ** 2 * (_GAMMA_WIDEST + 3)))


def sigma_rel_from_gamma(gamma: float) -> float:
    """The relative standard deviation of the profile tau^gamma (EDM2 eq. 3)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """The exponent of a profile of relative width ``sigma_rel``: the largest real root of
    g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2), i.e. (g + 2)^2 (g + 3) = s^-2 (g + 1)."""
    if not 0.0 < sigma_rel < SIGMA_REL_WIDEST:
        raise ValueError(f"sigma_rel must lie in (0, {SIGMA_REL_WIDEST:.4f}), got {sigma_rel!r}")
    s2 = sigma_rel ** -2.0
    roots = np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2])
    g = float(max(r.real for r in roots if abs(r.imag) <= 1e-7 * max(1.0, abs(r))))
    # One Newton step on f(g) = (g+2)^2 (g+3) - s^-2 (g+1) polishes np.roots' eigenvalue rounding.
    f = (g + 2) ** 2 * (g + 3) - s2 * (g + 1)
    df = 2 * (g + 2) * (g + 3) + (g + 2) ** 2 - s2
    return g - f / df if df else g


def beta(gamma: float, t_prev: int, t_next: int) -> float:
    """The decay of one update from ``t_prev`` to ``t_next`` images: (t_prev / t_next)^(gamma + 1)."""
    if t_next <= 0 or t_prev < 0 or t_prev > t_next:
        raise ValueError(f"update times must satisfy 0 <= t_prev <= t_next, 0 < t_next; got {t_prev}, {t_next}")
    return (t_prev / t_next) ** (gamma + 1.0)


def update_weights(gamma: float, at: int, times: np.ndarray) -> np.ndarray:
    """w_k: the weight of the model after each update (at ``times``, images, ascending, from the first
    update on) in the profile at time ``at``; zero for updates after ``at``. Sums to 1 when ``at`` is
    an update time."""
    t = np.asarray(times, dtype=np.float64)
    prev = np.concatenate([[0.0], t[:-1]])
    p = gamma + 1.0
    w = (np.minimum(t, at) / at) ** p - (np.minimum(prev, at) / at) ** p
    return w


def solve(basis: Sequence[tuple[float, int]], targets: Sequence[tuple[float, int]], times: np.ndarray,
          chunk: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares coefficients (len(targets), len(basis)) and each target's relative error.

    ``basis`` and ``targets`` are (gamma, time) profiles; ``times`` every update time up to the
    latest profile. Solves the normal equations G x = b of the per-update weight vectors (G: their
    inner products), accumulated over chunks of updates so memory stays O(chunk x profiles). The
    error is ||sum_i x_i w_i - w_r|| / ||w_r||: 0 when the target is a stored profile.
    """
    times = np.asarray(times, dtype=np.float64)
    nb, nt = len(basis), len(targets)
    gram = np.zeros((nb + nt, nb + nt))
    profiles = [*basis, *targets]
    for lo in range(0, len(times), chunk):
        seg = times[lo: lo + chunk]
        prev = np.concatenate([[times[lo - 1] if lo else 0.0], seg[:-1]])
        rows = np.empty((len(profiles), len(seg)))
        for i, (g, at) in enumerate(profiles):
            p = g + 1.0
            rows[i] = (np.minimum(seg, at) / at) ** p - (np.minimum(prev, at) / at) ** p
        gram += rows @ rows.T
    g_bb, g_bt, g_tt = gram[:nb, :nb], gram[:nb, nb:], gram[nb:, nb:]
    # lstsq (SVD) rather than solve: snapshots close in time make G nearly singular.
    x = np.linalg.lstsq(g_bb, g_bt, rcond=None)[0].T  # (targets, basis)
    resid = np.einsum("ri,ij,rj->r", x, g_bb, x) - 2 * np.einsum("ri,ir->r", x, g_bt) + np.diag(g_tt)
    err = np.sqrt(np.maximum(resid, 0.0) / np.diag(g_tt))
    return x, err
