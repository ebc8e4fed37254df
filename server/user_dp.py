"""User-level DP on the aggregate (DP-FedAvg): the noise, and the record of what a release carries.

Central DP: the server adds Gaussian noise to the sum of clipped deltas. Distributed DP
(under SecAgg+): the devices added their shares before masking and the server adds none.
"""

from __future__ import annotations

import numpy as np
from flwr.common import Scalar

from common import als
from common.config import FedRecConfig
from common.privacy import SecureGaussian, UserLevelDP
from common.secagg import noise_multiplier_present


def privatize(
    dp: UserLevelDP,
    mean_upload: list[np.ndarray],
    num_clients: int,
    rng: np.random.Generator | SecureGaussian,
    *,
    server_round: int,
    noise_on_devices: bool = False,
) -> list[np.ndarray]:
    """DP-FedAvg on the aggregate: noise on the sum of clipped deltas, fixed denominator.

    The sum is recovered from the mean over the ``num_clients`` clients that made it (all
    weights are 1 under user-level DP), gets Gaussian noise of std ``z * C`` from ``rng``
    (central DP; ``z`` is the round's, :meth:`UserLevelDP.noise_multiplier_at`), and is
    divided by the *expected* number of clients, which does not depend on who took part.
    With ``noise_on_devices`` (distributed DP under SecAgg+) the sum already carries the
    devices' noise shares and the server adds none. The touched vector is all ones by
    construction and is not data: it is reset, not noised.
    """
    noisy = []
    for delta in mean_upload[:-1]:
        total = delta.astype(np.float64) * num_clients
        if not noise_on_devices:
            total += rng.normal(0.0, dp.noise_std_at(server_round), size=total.shape)
        noisy.append(total / dp.expected_clients)
    return [*noisy, np.ones_like(mean_upload[-1], dtype=np.float64)]


def solve_item_factors(
    total: np.ndarray, num_items: int, config: FedRecConfig, dp: UserLevelDP | None, server_round: int
) -> np.ndarray:
    """ALS's item step from the summed statistics; under user-level DP with Private ALS's scales and ridge.

    The noise on the sum is at least ``z C`` per coordinate (central: exactly; distributed:
    ``z C sqrt(k / t)``), which sets the ridge (:func:`common.als.solve_items_private`).
    """
    if dp is None:
        return als.solve_items(total, num_items, config.embedding_dim).astype(np.float32)
    noise_std = dp.noise_std_at(server_round)
    return als.solve_items_private(total, num_items, config.embedding_dim, noise_std).astype(np.float32)


def noise_record(
    config: FedRecConfig, dp: UserLevelDP, survivors: int, server_round: int, *, noise_on_devices: bool
) -> dict[str, Scalar]:
    """The user-level noise this round's release really carries, and who added it.

    Distributed: ``survivors`` devices' shares, multiplier ``z sqrt(k / t)`` (the
    accountant keeps ``z``, a lower bound since ``k >= t``). Central: ``z`` from the server.
    """
    if noise_on_devices:
        return {"user_noise_added_by": "devices", "server_noise_std": 0.0,
                "noise_multiplier_present": noise_multiplier_present(config, survivors, server_round)}
    return {"user_noise_added_by": "server", "server_noise_std": dp.noise_std_at(server_round),
            "noise_multiplier_present": dp.noise_multiplier_at(server_round)}


def user_privacy(config: FedRecConfig, dp: UserLevelDP, server_round: int) -> dict[str, Scalar]:
    """User-level epsilon after ``server_round`` rounds, with its delta and accountant."""
    return {
        "user_epsilon": dp.epsilon(server_round, config.user_dp_accountant),
        "user_delta": dp.target_delta,
        "user_accountant": config.user_dp_accountant,
    }
