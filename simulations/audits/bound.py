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

An audit can only fail if it could print a bound above the claim. Its *ceiling* is the
bound it prints when every one of its r guesses is correct; it depends only on m, r, delta
and beta, so it is known before the run. With delta = 0 it solves q^r = beta, i.e. about
ln(1/beta) e^eps guesses for a ceiling of eps: the canaries needed grow exponentially with
the epsilon to be audited (:func:`canaries_needed`). With delta > 0 the 2 m delta term
caps the ceiling whatever m is (at delta = 1e-5, beta = 0.05 and half the canaries
guessed, no number of canaries reaches eps = 7.6).
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


def guess_counts(m: int, guess_fraction: float) -> tuple[int, int]:
    """(top, bottom) guesses for ``m`` canaries: ``guess_fraction`` of them, half on each side."""
    if not 0 < guess_fraction <= 1:
        raise ValueError(f"guess_fraction must be in (0, 1]; got {guess_fraction}")
    k = max(1, int(round(m * guess_fraction / 2)))
    return k, k


def ceiling(m: int, r: int, delta: float, beta: float = 0.05) -> float:
    """The largest bound an audit with ``m`` canaries and ``r`` guesses can print (all ``r`` correct)."""
    return epsilon_lower_bound(m, r, r, delta, beta)


def ceiling_exceeds(epsilon: float, m: int, guess_fraction: float, delta: float, beta: float = 0.05) -> bool:
    """Whether ``m`` canaries guessed at ``guess_fraction`` could print a bound above ``epsilon``.

    The bound is the largest epsilon whose p-value is below beta and the p-value rises with
    epsilon, so the ceiling exceeds ``epsilon`` exactly when all-correct has p-value < beta there.
    """
    k_pos, k_neg = guess_counts(m, guess_fraction)
    r = k_pos + k_neg
    return r <= m and p_value(m, r, r, epsilon, delta) < beta


def canaries_needed(epsilon: float, delta: float, beta: float = 0.05, guess_fraction: float = 0.5,
                    limit: int = 1_000_000) -> int | None:
    """The fewest canaries whose ceiling exceeds ``epsilon`` (None: not below ``limit``).

    None also when delta makes ``epsilon`` unreachable: the 2 m delta term of the p-value
    grows with m, so past some epsilon no number of canaries helps.
    """
    high = 2
    while not ceiling_exceeds(epsilon, high, guess_fraction, delta, beta):
        if high >= limit:
            return None
        high = min(2 * high, limit)
    low = high // 2  # ceiling(low) <= epsilon < ceiling(high), or low < 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if ceiling_exceeds(epsilon, mid, guess_fraction, delta, beta) else (mid, high)
    return high


def verdict(bound: float, ceiling_: float, claimed: float | None) -> str:
    """What one audit says about a claimed epsilon, in the words the report prints.

    A bound above the claim means the implementation or the accounting is wrong. A bound at
    or below it only counts as a pass when the audit could have printed more than the claim.
    """
    if claimed is None:
        return "no claim: nothing is accounted for this unit, the bound measures leakage"
    if bound > claimed:
        return "failed: bound above claim"
    if ceiling_ <= claimed:
        return "inconclusive: ceiling below claim"
    return "passed: bound at or below claim, ceiling above it"


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
        "epsilon_ceiling": ceiling(m, r, delta, beta),
    }
