"""The one-run epsilon lower bound of Steinke, Nasr and Jagielski (NeurIPS 2023).

"Privacy Auditing with One (1) Training Run", Theorem 3 (with delta) and the procedure of
its Appendix D. m canaries are each included independently with probability 1/2
(S in {-1,+1}^m); after one training run the auditor guesses T in {-1,0,+1}^m from the
output alone (abstaining with 0), r = ||T||_1 guesses, W = #{i: T_i = S_i} correct. If the
mechanism is (eps, delta)-DP with respect to each canary, then for every v

    P[W >= v] <= f(v) + 2 m delta * max_{i=1..v} (f(v - i) - f(v)) / i,
    f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v].

The right-hand side is the p-value of observing v correct guesses under "the mechanism is
(eps, delta)-DP"; the empirical lower bound at confidence 1 - beta is the largest eps whose
p-value is still below beta (the bound is valid with probability >= 1 - beta over S and
the run). Why this method: it needs a single training run, which is all a federated run
can afford, and it uses no group privacy across canaries.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[>= v of r guesses correct] bounded under (epsilon, delta)-DP (Theorem 3's right side)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m; got v={v}, r={r}, m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1]; got {epsilon}, {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of eps-DP randomized response
    tail = float(stats.binom.sf(v - 1, r, q))  # f(v) = P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    # max over i of (f(v - i) - f(v)) / i, where f(v - i) - f(v) = P[v - i <= Bin < v]
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[Bin = v-1], P[Bin = v-2], ...
    alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(tail + 2 * m * delta * alpha, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float = 0.05,
                        eps_max: float = 50.0, tolerance: float = 1e-6) -> float:
    """The largest epsilon the audit rejects at confidence 1 - beta (0.0: nothing rejected).

    ``m`` canaries (each in with probability 1/2), ``r`` guesses, ``v`` correct. The
    p-value rises with epsilon (stochastic dominance of the binomial), so the rejected
    epsilons form an interval [0, bound): bisection.
    """
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1); got {beta}")
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    if p_value(m, r, v, eps_max, delta) < beta:
        return eps_max
    low, high = 0.0, eps_max  # p(low) < beta <= p(high)
    while high - low > tolerance:
        mid = (low + high) / 2
        low, high = (mid, high) if p_value(m, r, v, mid, delta) < beta else (low, mid)
    return low


def one_run_guesses(scores: np.ndarray, k_pos: int, k_neg: int) -> np.ndarray:
    """Guess "in" (+1) for the ``k_pos`` highest scores, "out" (-1) for the ``k_neg`` lowest, abstain (0) on the rest.

    ``k_pos`` and ``k_neg`` must be fixed before looking at the outcome: choosing them by
    the number of correct guesses would void the bound.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if k_pos + k_neg > len(scores):
        raise ValueError(f"{k_pos} + {k_neg} guesses for {len(scores)} canaries")
    order = np.argsort(scores, kind="stable")
    guesses = np.zeros(len(scores), dtype=np.int64)
    if k_neg:
        guesses[order[:k_neg]] = -1
    if k_pos:
        guesses[order[len(scores) - k_pos:]] = 1
    return guesses


def audit_from_scores(scores: np.ndarray, included: np.ndarray, k_pos: int, k_neg: int,
                      delta: float, beta: float = 0.05) -> dict[str, float | int]:
    """Guess from ``scores``, count correct guesses against ``included``, and bound epsilon."""
    included = np.asarray(included, dtype=bool)
    guesses = one_run_guesses(scores, k_pos, k_neg)
    truth = np.where(included, 1, -1)
    r = int(np.count_nonzero(guesses))
    v = int(np.count_nonzero(guesses * truth == 1))
    m = len(scores)
    return {
        "canaries": m,
        "included": int(included.sum()),
        "guesses": r,
        "correct": v,
        "accuracy_of_guesses": v / r if r else float("nan"),
        "delta": delta,
        "beta": beta,
        "epsilon_lower_bound": epsilon_lower_bound(m, r, v, delta, beta),
    }
