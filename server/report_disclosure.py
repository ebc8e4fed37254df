"""The report's "what the server received" table: each reply field the run recorded, and what it tells.

The fields come from ``received.json`` (:mod:`server.disclosure`, measured on the replies);
this module only adds, per field, whether the server could read it and what a curious
server learns from it in this run's mode. A field it has no words for is still listed,
marked as unexplained, never dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.errors import DataError
from common.evaluation import GROUP_PREFIX, RECOMMENDED_ITEMS_KEY
from server.disclosure import EVALUATION_STAGE_SUFFIX, RECEIVED_FILE

__all__ = ["disclosure", "explain"]

PROTOCOL_STAGES = ("setup", "share_keys", "unmask")
TRAINING_STATISTICS = {
    "items_touched": "how many item rows this device's update changed: its user's interactions plus sampled negatives",
    "train_loss": "the device's training loss on its user's interactions",
    "train_seconds": "how long the device trained",
    "upload_bytes": "the size of the device's upload",
    "download_bytes": "the size of the model the device received",
    "record_epsilon": "the record-level epsilon this device has spent so far",
    "record_dp_declined": "whether the device declined to train because its record-level budget is spent",
}


def _update_words(run_config: dict[str, Any]) -> str:
    """What one device's update in the clear tells the server, by mode."""
    if run_config.get("model") == "ease":  # ease refuses both DPs
        return ("this device's item-item Gram (upper triangle of x x^T): its diagonal names every item the user "
                "trained on and the rest which pairs of them co-occur, nothing more (no ratings, no order)")
    if run_config.get("user-dp") and run_config.get("record-dp"):
        return ("this device's clipped DP-SGD update: Opacus noises every item row and the touched vector is all ones, "
                "so which rows changed no longer shows; record-level DP bounds what it reveals about one interaction, "
                "user-level DP only the released model")
    if run_config.get("record-dp"):
        return ("this device's DP-SGD update: Opacus noises every item row and the touched vector is all ones, so "
                "which rows changed no longer shows; record-level DP bounds what it reveals about one interaction")
    if run_config.get("user-dp"):
        return ("this device's clipped update, before any noise (the server adds the noise to the sum): the touched "
                "vector is all ones, but the non-zero item rows still name every item the user trained on")
    return ("this device's update: the touched vector and the non-zero item rows name every item the user trained "
            "on, and the deltas say how")


def explain(row: dict[str, Any], run_config: dict[str, Any]) -> tuple[str, str]:
    """(visibility, what it reveals) of one recorded field."""
    stage, record, key = row.get("stage", ""), row.get("record", ""), row.get("key", "")
    evaluation = stage.endswith(EVALUATION_STAGE_SUFFIX)
    if stage in PROTOCOL_STAGES:
        return "protocol", "SecAgg+ key material (public keys, encrypted key shares, node ids): nothing about the data"
    if key == "masked_params":
        what = "evaluation vector" if evaluation else "update"
        return "masked", (f"this device's {what}, masked: the server can only unmask the sum over the round's "
                          "surviving devices")
    if record.endswith(".status"):
        return "clear", "the reply's status code and message"
    if record == "fitres.parameters":
        return "clear", _update_words(run_config)
    if record == "fitres.num_examples":
        return "clear", ("the device's aggregation weight: 1 in an evaluation round, under user-level DP and with "
                         "client-weight uniform; else its number of training interactions")
    if record == "fitres.metrics":
        return "clear", TRAINING_STATISTICS.get(key, f"a training statistic of this device ({key})")
    if record == "evaluateres.loss":
        return "clear", "a constant placeholder (0.0)"
    if record == "evaluateres.num_examples":
        return "clear", "how many users this device evaluated"
    if record == "evaluateres.metrics":
        if key == RECOMMENDED_ITEMS_KEY:
            return "clear", ("the device's top-10 lists: with its NDCG sum they name the held-out item, i.e. an "
                             "interaction of its user")
        if key.startswith(GROUP_PREFIX):
            return "clear", "names a group (activity band or demographic) that one of the device's users is in"
        return "clear", ("an evaluation sum of this device; on a phone (one user) it is that user's own result, e.g. "
                         "the rank of the held-out item among the candidates")
    return "clear", "unexplained field: not described by this report"


def disclosure(path: Path, run_config: dict[str, Any]) -> dict[str, Any]:
    """The table of every reply field the server received in this run (``recorded`` false: no record)."""
    file = path / RECEIVED_FILE
    if not file.exists():
        return {"recorded": False, "fields": [],
                "note": "this run directory has no received.json: the fields the server received were not recorded"}
    try:
        rows = json.loads(file.read_text(encoding="utf-8"))["fields"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"not a record of received fields ({err})", file) from None
    fields = []
    for row in rows:
        visibility, reveals = explain(row, run_config)
        fields.append({**{k: row[k] for k in ("message_type", "stage", "record_kind", "record", "key", "type",
                                             "replies")}, "visibility": visibility, "reveals": reveals})
    clear = {f["record"] + "/" + f["key"] for f in fields if f["visibility"] == "clear"}
    note = ("every field of every reply the server received in this run, by name and type (values are never "
            f"recorded); {len(clear)} distinct fields reached the server in the clear")
    return {"recorded": True, "fields": fields, "note": note}
