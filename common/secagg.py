"""SecAgg+ and user-level DP together: Flower's quantization, the clip it leaves, the noise devices add.

What ``secaggplus_mod`` (flwr 1.41) does to a device's upload ``x`` with weight ``w``:
``dq = round(w / max_weight * T) / T``; ``x * dq`` is clipped to ``[-r, r]`` per coordinate,
mapped to ``(x * dq + r) * T / (2 r)`` and rounded *stochastically* to the floor or the
ceiling (``_stochastic_round``), so every coordinate moves by less than one step
``2 r / T``. The server dequantizes the sum and divides it by the sum of the ``dq``. A
device's contribution to the sum is therefore ``x`` plus an error of less than
``step / dq`` per coordinate, at most ``step / dq * sqrt(d)`` in L2 over ``d`` coordinates.

Under user-level DP every weight is 1 and ``max_weight`` is 1, so ``dq = 1``: the device
clips to ``C`` minus that worst case, and what the server dequantizes of it has L2 norm at
most ``C``, the sensitivity the accountant assumes.

Distributed noise: with SecAgg+ each device adds ``N(0, (z C)**2 / t)`` per coordinate to
its clipped deltas before the mod masks them; ``t`` is ``min-train-clients``, the fewest
survivors a round accepts (the server halts SecAgg+ before unmasking a smaller sum). A sum
of ``k >= t`` devices then carries noise of std ``z C sqrt(k / t) >= z C`` and the server
adds none.
"""

from __future__ import annotations

import math

from common.config import ConfigError, FedRecConfig
from common.models import CLOSED_FORM_MODELS
from common.privacy import round_noise_factor

# Clipping runs in float32 on the device (relative error ~1e-7); this share of C covers it.
FLOAT_ALLOWANCE = 1e-6
# The per-coordinate noise must stay this many standard deviations inside [-r, r]: the
# mod's clip to the range would otherwise cut the noise (P(|N| > 10 sigma) ~ 1.5e-23).
RANGE_SIGMAS = 10.0


def quantization_step(config: FedRecConfig) -> float:
    """One level of Flower's SecAgg+ quantization, ``2 r / T``."""
    return 2.0 * config.secagg_clipping_range / config.secagg_quantization_range


def uses_unit_weights(config: FedRecConfig) -> bool:
    """Every device weighs 1: DP-FedAvg counts each device once, and so do ``client-weight = uniform``, ALS and EASE."""
    return config.user_dp or config.client_weight == "uniform" or config.model in CLOSED_FORM_MODELS


def secagg_max_weight(config: FedRecConfig) -> float:
    """The max weight SecAgg+ runs with: 1 when every weight is 1 (no 1/max_weight shrink before rounding)."""
    return 1.0 if uses_unit_weights(config) else config.secagg_max_weight


def weight_fraction(config: FedRecConfig, weight: float = 1.0) -> float:
    """``dq``: the factor the mod scales an upload of ``weight`` by before quantizing it."""
    target = config.secagg_quantization_range
    return round(weight / secagg_max_weight(config) * target) / target


def rounding_slack(config: FedRecConfig, num_coordinates: int) -> float:
    """Worst-case L2 distance between a unit-weight device's deltas and their dequantized contribution to the sum."""
    per_coordinate = quantization_step(config) / weight_fraction(config)
    return per_coordinate * math.sqrt(num_coordinates) + FLOAT_ALLOWANCE * config.user_dp_clipping_norm


def device_clipping_norm(config: FedRecConfig, num_coordinates: int) -> float:
    """The L2 norm a device clips its deltas to under user-level DP.

    ``C`` without SecAgg+; with it, ``C`` minus the worst-case rounding, so that the server's
    dequantized copy of the update has norm at most ``C``. A slack of half the clip or more
    is refused: the device would keep too little of its update to be worth the round.
    """
    clip = config.user_dp_clipping_norm
    if not config.secure_aggregation:
        return clip
    slack = rounding_slack(config, num_coordinates)
    if slack >= clip / 2:
        raise ConfigError(
            f"user-dp with secure-aggregation: SecAgg+'s rounding can move an update by up to {slack:.3g} "
            f"(step {quantization_step(config):.3g} x sqrt({num_coordinates}) coordinates), half or more of "
            f"user-dp-clipping-norm {clip:g}; raise secagg-quantization-range, lower secagg-clipping-range "
            "or raise user-dp-clipping-norm"
        )
    return clip - slack


def distributed_noise(config: FedRecConfig) -> bool:
    """User-level DP under SecAgg+: the devices add the noise, the server adds none."""
    return config.user_dp and config.secure_aggregation


def min_survivors(config: FedRecConfig) -> int:
    """``t``: the fewest devices whose masked sum the server may unmask (and apply)."""
    return max(1, config.min_train_clients)


def round_noise_multiplier(config: FedRecConfig, server_round: int) -> float:
    """``z`` of round ``server_round`` as the run-config sets it (:func:`common.privacy.round_noise_factor`)."""
    return config.user_dp_noise_multiplier * round_noise_factor(config.user_dp_first_round_noise, server_round)


def noise_share_std(config: FedRecConfig, server_round: int = 0) -> float:
    """Per-coordinate std of one device's share, ``z C / sqrt(t)``: ``t`` shares make ``z C`` (round 0: the largest)."""
    z = round_noise_multiplier(config, server_round)
    return z * config.user_dp_clipping_norm / math.sqrt(min_survivors(config))


def noise_multiplier_present(config: FedRecConfig, survivors: int, server_round: int) -> float:
    """The noise multiplier a sum of ``survivors`` devices' shares really carries: ``z sqrt(k / t)``."""
    return round_noise_multiplier(config, server_round) * math.sqrt(survivors / min_survivors(config))


def check_distributed_noise(config: FedRecConfig, num_coordinates: int) -> None:
    """Refuse user-dp + SecAgg+ settings whose rounding eats the clip or whose range would cut the noise."""
    if not distributed_noise(config):
        return
    device_clipping_norm(config, num_coordinates)
    needed = config.user_dp_clipping_norm + RANGE_SIGMAS * noise_share_std(config)
    if config.secagg_clipping_range < needed:
        raise ConfigError(
            f"user-dp with secure-aggregation: secagg-clipping-range {config.secagg_clipping_range:g} would cut "
            f"the devices' noise (clip {config.user_dp_clipping_norm:g} + {RANGE_SIGMAS:g} x share std "
            f"{noise_share_std(config):.3g}); set secagg-clipping-range >= {needed:.3g}"
        )
