"""What a round's record says: client counts, failures, training and evaluation summaries.

Pure functions over the replies; the strategy writes their result to the run directory.
The key order of each summary is the column order of ``metrics.csv``.
"""

from __future__ import annotations

import numpy as np
from flwr.common import EvaluateRes, FitRes, Scalar
from flwr.server.client_proxy import ClientProxy

from common.config import FLEET_FAILURE_PREFIX, FedRecConfig
from common.metrics import merge_sums
from server.list_metrics import catalogue_summary, group_summary

EVALUATION_PREFIXES = ("test", "val", "new", "exposure")


def describe_failure(failure: tuple[ClientProxy, FitRes | EvaluateRes] | BaseException) -> str:
    """One line on why a client failed, for the server log."""
    if isinstance(failure, BaseException):
        text = str(failure)
        if "Message:" in text:  # Ray wraps the ClientApp's exception in a long traceback
            text = text.rsplit("Message:", 1)[1]
        text = text.replace("\\n", "\n").strip().split("\n")[0]
        return text.strip(" '\"<>") or repr(failure)
    return f"node {failure[0].node_id}: {failure[1].status.message}"


def failure_kinds(failures: list[tuple[ClientProxy, FitRes] | BaseException]) -> dict[str, int]:
    """Failed replies by kind: devices a simulated fleet made absent or late (``client.fleet``)."""
    texts = [describe_failure(failure) for failure in failures]
    late = sum(FLEET_FAILURE_PREFIX in text and "deadline" in text for text in texts)
    absent = sum(FLEET_FAILURE_PREFIX in text for text in texts) - late
    return {"clients_unavailable": absent, "clients_late": late} if failures else {}


def fit_counts(
    sampled: int, valid: int, replies: int, failures: list[tuple[ClientProxy, FitRes] | BaseException],
    rejected: dict[str, int], excluded: int,
) -> dict[str, Scalar]:
    """Who was asked, who answered usefully, who failed, was rejected or is excluded."""
    return {
        "clients_sampled": sampled,
        "clients_ok": valid,
        "clients_failed": len(failures),
        **failure_kinds(failures),
        # Sampled devices whose reply never came (a deployment's round-deadline passed).
        "clients_no_reply": max(0, sampled - replies - len(failures)),
        "clients_rejected": sum(rejected.values()),
        **{f"rejected_{reason}": count for reason, count in rejected.items()},
        "clients_excluded": excluded,
    }


def fit_summary(client_metrics: list[dict[str, Scalar]], mean_touched: np.ndarray) -> dict[str, Scalar]:
    """Means of what the devices reported, and how many item rows the round updated."""
    def mean(key: str) -> float:
        values = [float(m[key]) for m in client_metrics if key in m]
        return float(np.mean(values)) if values else float("nan")

    return {
        "train_loss": mean("train_loss"),
        "client_train_seconds": mean("train_seconds"),
        "upload_bytes_per_client": mean("upload_bytes"),
        "download_bytes_per_client": mean("download_bytes"),
        "items_touched_per_client": mean("items_touched"),
        "item_rows_updated": int(np.count_nonzero(mean_touched)),
    }


def record_dp_summary(config: FedRecConfig, client_metrics: list[dict[str, Scalar]]) -> dict[str, Scalar]:
    """Record-level privacy spend as the devices reported it (their Opacus accountants)."""
    spent = [float(m["record_epsilon"]) for m in client_metrics if "record_epsilon" in m]
    return {
        "record_epsilon_max": max(spent) if spent else 0.0,
        "record_epsilon_mean": float(np.mean(spent)) if spent else 0.0,
        "record_delta": config.record_dp_delta,
        "record_dp_declined": int(sum(float(m.get("record_dp_declined", 0)) for m in client_metrics)),
    }


def split_prefixed(metrics: list[dict[str, Scalar]], prefix: str) -> list[dict[str, float]]:
    """Per-client sums under ``prefix_`` with the prefix removed (for :func:`merge_sums`)."""
    parts = []
    for m in metrics:
        part = {k[len(prefix) + 1 :]: float(v) for k, v in m.items() if k.startswith(prefix + "_")}
        if part.get("count", 0) > 0:
            parts.append(part)
    return parts


def evaluation_summary(
    config: FedRecConfig, metrics_list: list[dict[str, Scalar]], counts: np.ndarray | None, devices: int,
    failures: int, *, item_popularity: np.ndarray | None, num_users: int, whole_population: bool,
) -> dict[str, Scalar]:
    """The devices' evaluation sums merged by users, with catalogue and group measures.

    ``whole_population``: every device was asked (the final full evaluation).
    """
    summary: dict[str, Scalar] = {"eval_clients": devices, "eval_failures": failures}
    for prefix in EVALUATION_PREFIXES:
        merged = merge_sums(split_prefixed(metrics_list, prefix))
        summary.update({f"{prefix}_{k}": v for k, v in merged.items()})
    if counts is not None:
        summary.update(catalogue_summary(counts, item_popularity, num_users))
    if config.group_min_users > 0:
        summary.update(group_summary(metrics_list, config.group_min_users))
    if whole_population:
        summary["eval_population"] = "all"
    return summary
