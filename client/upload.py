"""What a device's training reply carries besides its deltas: weight, clip, noise share, metrics.

These decide what the server (or SecAgg+'s sum) can learn from one device, so they are
kept together and free of the Flower client plumbing.
"""

from __future__ import annotations

import numpy as np

from common import als
from common.config import FedRecConfig
from common.models import CLOSED_FORM_MODELS
from common.privacy import SecureGaussian
from common.secagg import device_clipping_norm, distributed_noise, noise_share_std
from common.updates import for_transport

# What a device may report when DP is on: nothing computed from its data beyond what the
# mechanisms cover (the loss, the update norm and the touched count are not).
DP_SAFE_METRICS = ("train_seconds", "upload_bytes", "download_bytes", "record_epsilon", "record_dp_declined")


def aggregation_weight(config: FedRecConfig, num_examples: int, declined: bool) -> int:
    """The weight a device reports with its upload."""
    if config.user_dp or declined or config.client_weight == "uniform" or config.model in CLOSED_FORM_MODELS:
        # DP-FedAvg and client-weight=uniform: every client counts once; a declined device sends zeros;
        # ALS and EASE: the server needs the plain sum of the statistics.
        return 1
    if config.secure_aggregation:
        # SecAgg+ quantizes the weight against max-weight and would overflow above it.
        return min(num_examples, int(config.secagg_max_weight))
    return num_examples


def clipping_norm_for(config: FedRecConfig, shared: list[np.ndarray]) -> float | None:
    """The L2 norm this device clips its deltas to (None without user-dp).

    Under SecAgg+ the worst-case quantization error of ``shared``'s coordinates is taken
    off the clip, so what the server dequantizes of the update stays within the clip.
    ALS uploads statistics, not deltas of ``shared``: their count is what SecAgg+ rounds.
    """
    if not config.user_dp:
        return None
    if config.model == "als":
        return device_clipping_norm(config, als.statistics_size(*np.shape(shared[0]), private=True))
    return device_clipping_norm(config, sum(int(np.size(array)) for array in shared))


def with_noise_share(config: FedRecConfig, upload: list[np.ndarray], server_round: int = 0) -> list[np.ndarray]:
    """Distributed DP: the clipped deltas plus this device's share of the Gaussian noise, in float64.

    Added before ``secaggplus_mod`` masks the upload, so the sum the server unmasks already
    carries the noise. The touched vector (all ones under user-dp) gets none. float64 keeps
    Flower's quantization exact to well below one step; the float upload never leaves the
    device (SecAgg+ sends masked integers). ``server_round`` 0 (not known): the largest share.
    """
    sampler, std = SecureGaussian(), noise_share_std(config, server_round)
    deltas = [array.astype(np.float64) + sampler.normal(0.0, std, array.shape) for array in upload[:-1]]
    return [*deltas, upload[-1].astype(np.float64)]


def dp_safe(config: FedRecConfig, metrics: dict) -> dict:
    """Under either DP only the metrics the mechanisms cover (or that are not data) leave the device."""
    if config.user_dp or config.record_dp:
        return {k: v for k, v in metrics.items() if k in DP_SAFE_METRICS}
    return metrics


def finish_reply(
    config: FedRecConfig, upload: list[np.ndarray], num_examples: int, declined: bool, metrics: dict,
    server_round: int,
) -> tuple[list[np.ndarray], int, dict]:
    """A trained round's upload as the device sends it: weight, transport dtype, noise share, DP-safe metrics.

    Shared by the ClientApp and the vectorized backend, so both send the same reply.
    """
    weight = aggregation_weight(config, num_examples, declined)
    if config.popularity == "positives":  # counts over the weight: the server's weighted mean sums them
        upload[-2] = upload[-2] / weight
    sent = for_transport(upload, config.transport_dtype)
    metrics = {**metrics, "upload_bytes": float(sum(a.nbytes for a in sent))}
    if distributed_noise(config):
        sent = with_noise_share(config, upload, server_round)
    return sent, weight, dp_safe(config, metrics)
