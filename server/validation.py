"""Update validation, rejection and exclusion: bad uploads never reach the aggregate.

Structure first (arrays, shapes, dtypes, NaN/Inf, touched flags, example count, the
user-dp clipping), then the norm rules over the structurally sound uploads. A node
rejected ``exclude-after-rejections`` times is not sampled again in this run.
"""

from __future__ import annotations

from logging import ERROR, WARNING

import numpy as np
from flwr.common import FitRes, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion
from flwr.supercore.differential_privacy import get_norm

from common.config import FedRecConfig
from common.privacy import UserLevelDP
from common.updates import REJECTION_REASONS, UpdateLayout, UpdateRejected, validate_upload
from common.wire import parameters_arrays

Results = list[tuple[ClientProxy, FitRes]]


def check_clipped(upload: list[np.ndarray], clipping_norm: float, slack: float = 1e-4) -> None:
    """Under user-level DP every client's deltas (all but the touched vector) have norm <= C."""
    norm = get_norm(upload[:-1])
    if norm > clipping_norm * (1 + slack):
        raise UpdateRejected("clipping", f"update norm {norm:.6g} exceeds the user-dp clipping norm {clipping_norm}")
    if not np.all(upload[-1] == 1.0):
        raise UpdateRejected(
            "clipping", "under user-dp the touched vector must be all ones (it would leak which items were trained)"
        )


def readable_arrays(res: FitRes) -> list[np.ndarray]:
    """The upload's arrays; bytes that are no numpy array (truncated, not ``np.save``'s) are a rejected upload,
    not an error that ends the round."""
    try:
        return parameters_arrays(res.parameters)
    except (ValueError, EOFError) as err:
        raise UpdateRejected("arrays", f"update arrays cannot be read: {err}") from None


def check_norms(norms: list[float], max_norm: float, factor: float) -> list[str | None]:
    """Per update, why its delta norm is absurd (None: fine).

    Two rules: an absolute ceiling, and a multiple of the round's median norm, which adapts
    to the dataset and model (a heavy user's honest update is tens of times the median, a
    boosted poisoning update is orders of magnitude above it; on MovieLens-100K the heaviest
    honest user's first update is 33x the median, 3.5x by round 100, hence the default of 100). The rule needs at
    least 5 updates for the median to mean anything.
    """
    median = float(np.median(norms)) if len(norms) >= 5 else 0.0
    reasons: list[str | None] = []
    for norm in norms:
        if max_norm > 0 and norm > max_norm:
            reasons.append(f"update norm {norm:.4g} exceeds max-update-norm {max_norm:g}")
        elif factor > 0 and median > 0 and norm > factor * median:
            reasons.append(f"update norm {norm:.4g} exceeds {factor:g} x the round's median norm {median:.4g}")
        else:
            reasons.append(None)
    return reasons


class NotExcluded(Criterion):
    """Sampling criterion: nodes the strategy has excluded for repeated bad updates are skipped."""

    def __init__(self, excluded: set[int]) -> None:
        self.excluded = excluded

    def select(self, client: ClientProxy) -> bool:
        return client.node_id not in self.excluded


class Exclusions:
    """Rejected updates per node, and the nodes excluded for the rest of the run."""

    def __init__(self, limit: int) -> None:
        """``limit``: rejections after which a node is excluded (0: never)."""
        self.limit = limit
        self.rejections: dict[int, int] = {}
        self.excluded: set[int] = set()

    def reject(self, proxy: ClientProxy, reason: str, message: str, counts: dict[str, int]) -> None:
        """Count one rejected update under ``reason``, log why, and exclude the node at the limit."""
        counts[reason] += 1
        strikes = self.rejections.get(proxy.node_id, 0) + 1
        self.rejections[proxy.node_id] = strikes
        log(WARNING, "rejecting update from node %s (%s): %s", proxy.node_id, reason, message)
        if self.limit > 0 and strikes >= self.limit and proxy.node_id not in self.excluded:
            self.excluded.add(proxy.node_id)
            log(WARNING, "node %s excluded for the rest of the run after %s rejected updates", proxy.node_id, strikes)


def validate_aggregate(layout: UpdateLayout, results: Results) -> tuple[Results, dict[str, int]]:
    """One masked sum for all clients (SecAgg+): only the aggregate itself can be checked."""
    rejected = dict.fromkeys(REJECTION_REASONS, 0)
    try:
        if results:
            validate_upload(layout, parameters_to_ndarrays(results[0][1].parameters), one_client=False)
    except UpdateRejected as err:
        log(ERROR, "rejecting the securely aggregated update: %s", err)
        rejected[err.reason] = len(results)
        return [], rejected
    return results, rejected


def validate_uploads(
    config: FedRecConfig, layout: UpdateLayout, user_dp: UserLevelDP | None, results: Results, exclusions: Exclusions
) -> tuple[Results, dict[str, int]]:
    """Drop bad uploads with a logged reason per client; count them by reason."""
    rejected = dict.fromkeys(REJECTION_REASONS, 0)
    sound, norms = [], []
    for proxy, res in results:
        try:
            if res.num_examples <= 0:
                raise UpdateRejected("no_examples", "reported no training examples")
            upload = readable_arrays(res)
            norm = validate_upload(layout, upload, positives_per_example=config.client_weight == "examples")
            if user_dp is not None:
                check_clipped(upload, user_dp.clipping_norm)
        except UpdateRejected as err:
            exclusions.reject(proxy, err.reason, str(err), rejected)
            continue
        sound.append((proxy, res))
        norms.append(norm)
    valid = []
    for (proxy, res), why in zip(sound, check_norms(norms, config.max_update_norm, config.reject_norm_factor), strict=True):
        if why is None:
            valid.append((proxy, res))
        else:
            exclusions.reject(proxy, "norm", why, rejected)
    return valid, rejected
