"""User-level privacy accounting for DP-FedAvg, computed with Google's ``dp-accounting``.

Every epsilon fedrec reports comes from an accountant fed with the parameters of the run
that really happened: the noise multiplier, how clients were sampled and how many rounds
ran. The sampling matters as much as the noise:

* ``poisson``: each client joins a round independently with probability ``q``. The
  accountant composes ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` per round under
  add/remove-one-client neighbouring (both RDP and PLD support it).
* ``fixed``: exactly ``m`` of ``N`` clients, without replacement (Flower's default). The
  accountant composes ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))``
  under replace-one-client neighbouring (RDP only): replacing one client's clipped update
  by another moves the sum by up to ``2 C``, so the noise is ``z / 2`` sensitivities.

Flower's own DP wrappers account without any sampling amplification; for q = 0.01,
z = 1 and 1,000 rounds that reads epsilon ~655 where Poisson accounting gives ~2.

Delta must be far below 1 / N: a mechanism that publishes one randomly chosen client's
data outright is (0, 1/N)-DP. The default is min(1e-5, N^-1.1) and a delta >= 1 / N is
refused.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

# dp-accounting is imported where an accountant is built or an event described: the import
# takes about 0.85 s (it loads scipy.signal and scipy.stats), which every ClientApp paid for
# SecureGaussian alone.
if TYPE_CHECKING:
    import dp_accounting

# dp-accounting logs a warning for every RDP order whose series does not converge and is
# dropped from the minimum; that is expected for small orders at large q and not actionable.
logging.getLogger("absl").setLevel(logging.ERROR)

SAMPLINGS = ("poisson", "fixed")
MAX_DEFAULT_DELTA = 1e-5
DEFAULT_DELTA_EXPONENT = 1.1
ACCOUNTANTS = ("rdp", "pld")

# User-level DP noise (the server's central noise and the devices' shares under SecAgg+)
# comes from :class:`SecureGaussian`; every run records this string so the report can state it.
NOISE_GENERATOR = (
    "os.urandom (OS CSPRNG): 53-bit uniform doubles, Box-Muller transform in float64 (tails cut at 8.57 sigma; "
    "no defence against floating-point attacks on the Gaussian's low-order bits)"
)
# Record-level DP: what client.private_training hands Opacus as its noise_generator.
RECORD_NOISE_GENERATOR = (
    "torch.Generator (CPU, Mersenne Twister mt19937; not a CSPRNG), seeded per device and round with 63 bits "
    "from secrets.randbits (OS entropy); Opacus secure_mode off"
)


class SecureGaussian:
    """Gaussian noise whose every bit comes from the OS's CSPRNG (``os.urandom``).

    numpy's generators (PCG64, Mersenne Twister) are predictable from their output; noise
    that protects users must not be. Uniform doubles are built from 53 random bits each
    and turned into normals by Box-Muller, vectorised (item tables reach ~10**6 rows x dims).
    Offers ``normal(loc, scale, size)`` like :class:`numpy.random.Generator`.
    """

    def normal(self, loc: float = 0.0, scale: float = 1.0, size: int | tuple[int, ...] | None = None) -> np.ndarray:
        shape = () if size is None else (size,) if isinstance(size, int) else tuple(size)
        count = math.prod(shape)
        pairs = (count + 1) // 2
        u1 = 1.0 - secure_uniform(pairs)  # (0, 1]: log is finite
        u2 = secure_uniform(pairs)
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = 2.0 * np.pi * u2
        normals = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]
        return (loc + scale * normals).reshape(shape)


def secure_uniform(count: int) -> np.ndarray:
    """``count`` doubles uniform on [0, 1), 53 bits each from ``os.urandom``."""
    words = np.frombuffer(os.urandom(8 * count), dtype=np.uint64)
    return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53


def round_noise_factor(first_round_noise: float, server_round: int) -> float:
    """How many times the base noise multiplier round ``server_round`` carries.

    Round 1: ``first_round_noise``; later rounds: 1. Round 0 (not known, e.g. a device's
    request without its number) gets the larger of the two: whoever cannot tell errs towards
    more noise.
    """
    if server_round == 1:
        return first_round_noise
    if server_round == 0:
        return max(first_round_noise, 1.0)
    return 1.0


@dataclass(frozen=True)
class UserLevelDP:
    """DP-FedAvg's mechanism: clip each client's update to ``clipping_norm``, add Gaussian noise
    of std ``noise_multiplier * clipping_norm`` to the sum, sample clients per ``sampling``."""

    noise_multiplier: float
    clipping_norm: float
    num_clients: int
    sampling: str
    sampling_rate: float = 0.0  # poisson: each client's probability of joining a round
    sample_size: int = 0  # fixed: clients per round
    delta: float = 0.0  # 0: default_delta(num_clients)
    first_round_noise: float = 1.0  # round 1's noise multiplier is this x noise_multiplier

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}; got {self.sampling!r}")
        if self.noise_multiplier <= 0 or self.clipping_norm <= 0 or self.first_round_noise <= 0:
            raise ValueError("noise_multiplier, clipping_norm and first_round_noise must be > 0")
        if self.num_clients < 1:
            raise ValueError(f"num_clients must be >= 1; got {self.num_clients}")
        if self.sampling == "poisson" and not 0 < self.sampling_rate <= 1:
            raise ValueError(f"poisson sampling needs a rate in (0, 1]; got {self.sampling_rate}")
        if self.sampling == "fixed" and not 1 <= self.sample_size <= self.num_clients:
            raise ValueError(f"fixed sampling needs 1 <= sample_size <= {self.num_clients}; got {self.sample_size}")
        if self.delta < 0 or self.delta >= 1.0 / self.num_clients:
            raise ValueError(delta_problem(self.delta, self.num_clients))

    @property
    def target_delta(self) -> float:
        return self.delta if self.delta > 0 else default_delta(self.num_clients)

    @property
    def noise_std(self) -> float:
        """Std of the Gaussian noise added to the *sum* of clipped updates (every round after the first)."""
        return self.noise_multiplier * self.clipping_norm

    def noise_multiplier_at(self, server_round: int) -> float:
        """Round ``server_round``'s noise multiplier: ``first_round_noise`` times larger in round 1 (:func:`round_noise_factor`).

        A first round that only seeds the model (Private ALS's start from random item factors)
        can take more noise and leave more of the budget to the rounds that matter.
        """
        return self.noise_multiplier * round_noise_factor(self.first_round_noise, server_round)

    def noise_std_at(self, server_round: int) -> float:
        """Std of the noise on round ``server_round``'s sum of clipped updates."""
        return self.noise_multiplier_at(server_round) * self.clipping_norm

    @property
    def expected_clients(self) -> float:
        """The fixed denominator of the noisy mean: q N (poisson) or m (fixed)."""
        if self.sampling == "poisson":
            return self.sampling_rate * self.num_clients
        return float(self.sample_size)

    @property
    def neighbouring(self) -> str:
        return "add or remove one client" if self.sampling == "poisson" else "replace one client"

    def round_event(self, server_round: int = 2) -> dp_accounting.DpEvent:
        """Round ``server_round`` of the mechanism as a dp-accounting event (any round but the first by default)."""
        import dp_accounting

        z = self.noise_multiplier_at(server_round)
        if self.sampling == "poisson":
            return dp_accounting.PoissonSampledDpEvent(self.sampling_rate, dp_accounting.GaussianDpEvent(z))
        return dp_accounting.SampledWithoutReplacementDpEvent(
            self.num_clients, self.sample_size, dp_accounting.GaussianDpEvent(z / 2)
        )

    def rounds_event(self, rounds: int) -> dp_accounting.DpEvent:
        """Rounds 1 to ``rounds`` composed: round 1's own event, then the others self-composed."""
        import dp_accounting

        if self.first_round_noise == 1.0:
            return dp_accounting.SelfComposedDpEvent(self.round_event(), rounds)
        events = [self.round_event(1)]
        if rounds > 1:
            events.append(dp_accounting.SelfComposedDpEvent(self.round_event(), rounds - 1))
        return dp_accounting.ComposedDpEvent(events)

    def epsilon(self, rounds: int, accountant: str = "rdp") -> float:
        """Epsilon at ``target_delta`` after ``rounds`` rounds (0 for none)."""
        if rounds <= 0:
            return 0.0
        acc = _accountant(accountant, self.sampling)
        acc.compose(self.rounds_event(rounds))
        return float(acc.get_epsilon(self.target_delta))

    def max_rounds(self, budget: float, accountant: str = "rdp", upper: int = 100_000) -> int:
        """The most rounds whose epsilon stays within ``budget`` (epsilon grows with rounds)."""
        if self.epsilon(1, accountant) > budget:
            return 0
        low, high = 1, 1
        while high < upper and self.epsilon(high, accountant) <= budget:
            low, high = high, min(2 * high, upper)
        if self.epsilon(high, accountant) <= budget:
            return high
        while high - low > 1:  # epsilon(low) <= budget < epsilon(high)
            mid = (low + high) // 2
            low, high = (mid, high) if self.epsilon(mid, accountant) <= budget else (low, mid)
        return low

    def describe(self) -> dict[str, float | int | str]:
        """The parameters a report needs to restate the guarantee."""
        return {
            "mechanism": "DP-FedAvg: per-client L2 clipping, Gaussian noise on the sum",
            "noise_multiplier": self.noise_multiplier,
            "clipping_norm": self.clipping_norm,
            "noise_std_on_sum": self.noise_std,
            "first_round_noise": self.first_round_noise,
            "noise_std_on_sum_round_1": self.noise_std_at(1),
            "sampling": self.sampling,
            "sampling_rate": self.sampling_rate if self.sampling == "poisson" else self.sample_size / self.num_clients,
            "clients_per_round": self.expected_clients,
            "num_clients": self.num_clients,
            "delta": self.target_delta,
            "neighbouring": self.neighbouring,
            "noise_generator": NOISE_GENERATOR,
        }


def default_delta(num_clients: int) -> float:
    """min(1e-5, N^-1.1): far below 1 / N for every population size."""
    return min(MAX_DEFAULT_DELTA, float(num_clients) ** -DEFAULT_DELTA_EXPONENT)


def delta_problem(delta: float, num_clients: int) -> str:
    """Why ``delta`` is no guarantee for ``num_clients`` clients (one line, for the error)."""
    return (
        f"user-dp-delta {delta:g} must be below 1/N = {1.0 / num_clients:.3g} (N = {num_clients} clients): at "
        f"delta >= 1/N publishing one client's data outright would qualify; use 0 for the default "
        f"min(1e-5, N^-1.1) = {default_delta(num_clients):.3g}"
    )


def calibrate_noise(
    target_epsilon: float, rounds: int, accountant: str = "rdp", *, tolerance: float = 1e-3, **mechanism
) -> float:
    """The smallest noise multiplier whose ``rounds`` rounds stay within ``target_epsilon``.

    ``mechanism`` holds the other :class:`UserLevelDP` fields (clipping norm, clients,
    sampling, delta). Bisection on z; epsilon falls monotonically as z grows.
    """
    def eps(z: float) -> float:
        return UserLevelDP(noise_multiplier=z, **mechanism).epsilon(rounds, accountant)

    low, high = 0.05, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"no noise multiplier below 1e4 reaches epsilon {target_epsilon} in {rounds} rounds")
    while high - low > tolerance * high:
        mid = (low + high) / 2
        low, high = (low, mid) if eps(mid) <= target_epsilon else (mid, high)
    return high


def _accountant(name: str, sampling: str) -> dp_accounting.PrivacyAccountant:
    import dp_accounting
    from dp_accounting import pld, rdp

    relation = (
        dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
        if sampling == "poisson"
        else dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    if name == "rdp":
        return rdp.RdpAccountant(neighboring_relation=relation)
    if name == "pld":
        if sampling != "poisson":
            raise ValueError("the PLD accountant covers Poisson sampling only; use rdp for fixed-size sampling")
        return pld.PLDAccountant(neighboring_relation=relation)
    raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}; got {name!r}")
