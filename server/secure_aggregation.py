"""Flower's SecAgg+ fit stage, configured for fedrec's weights and, under user-level DP, its noise.

Under distributed DP (user-dp + secure-aggregation) every device adds a share of the
Gaussian noise sized for ``t`` = min-train-clients survivors. A sum of fewer devices would
carry less noise than the accountant assumes, and SecAgg+ reveals the sum as soon as the
masks are removed: :class:`MinimumSurvivorsSecAggPlus` stops the protocol before the unmask
stage in that case, so the server never learns it (the round is recorded as skipped).
"""

from __future__ import annotations

from logging import WARNING

from flwr.common.logger import log
from flwr.server.workflow import SecAggPlusWorkflow

from common.config import FedRecConfig
from common.secagg import distributed_noise, min_survivors, secagg_max_weight


class MinimumSurvivorsSecAggPlus(SecAggPlusWorkflow):
    """SecAgg+ that never unmasks a sum of fewer than ``min_survivors`` devices."""

    def __init__(self, *, min_survivors: int, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.min_survivors = min_survivors

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:  # type: ignore[no-untyped-def]
        if not super().collect_masked_vectors_stage(grid, context, state):
            return False
        survivors = len(state.active_node_ids)
        if survivors < self.min_survivors:
            log(WARNING, "SecAgg+: %s masked updates < %s, the fewest whose noise shares add up to the "
                "accounted noise; not unmasking this round", survivors, self.min_survivors)
            return False
        return True


def secagg_workflow(config: FedRecConfig) -> SecAggPlusWorkflow:
    """The SecAgg+ fit stage for this run (max weight 1 when every device weighs 1)."""
    settings = dict(
        num_shares=config.secagg_num_shares,
        reconstruction_threshold=config.secagg_reconstruction_threshold,
        max_weight=secagg_max_weight(config),
        clipping_range=config.secagg_clipping_range,
        quantization_range=config.secagg_quantization_range,
    )
    if distributed_noise(config):
        return MinimumSurvivorsSecAggPlus(min_survivors=min_survivors(config), **settings)
    return SecAggPlusWorkflow(**settings)


SECAGG_MODULUS = 2**32  # SecAggPlusWorkflow's default modulus_range


def check_secagg_capacity(num_clients: int, quantization_range: int) -> None:
    """SecAgg+ sums quantized uploads modulo 2**32; too many clients would wrap around silently."""
    if num_clients * quantization_range >= SECAGG_MODULUS:
        raise ValueError(
            f"{num_clients} clients per round x secagg-quantization-range {quantization_range} overflows "
            f"SecAgg+'s modulus 2**32; lower secagg-quantization-range to below {SECAGG_MODULUS // num_clients} "
            "or sample fewer clients per round"
        )
