"""The ClientApp's secure-aggregation switch and aggregation weight, without running a federation."""

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import aggregation_weight, secure_aggregation_mod
from common.config import parse_run_config
from simulations.engine import fused_run_config


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Flower stamps messages with the running task's ids; outside a run we provide them."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1, raising=False)


def _context(secure: bool) -> Context:
    run_config = fused_run_config({"secure-aggregation": secure})
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config=run_config)


def _message(kind: str) -> Message:
    return Message(RecordDict(), dst_node_id=1, message_type=kind)


def test_without_secure_aggregation_messages_pass_straight_through():
    seen = []
    reply = secure_aggregation_mod(_message(MessageType.TRAIN), _context(False), lambda m, c: seen.append(m) or "reply")
    assert reply == "reply" and len(seen) == 1


def test_with_secure_aggregation_a_plain_training_request_is_refused():
    def train(m, c):
        raise AssertionError("the client must not train for an unmasked upload")

    with pytest.raises(RuntimeError, match="refusing to upload an unmasked update"):
        secure_aggregation_mod(_message(MessageType.TRAIN), _context(True), train)


def test_with_secure_aggregation_a_plain_evaluation_request_is_refused():
    def evaluate(m, c):
        raise AssertionError("the client must not send its evaluation sums in the clear")

    with pytest.raises(RuntimeError, match="evaluation sums travel only through SecAgg"):
        secure_aggregation_mod(_message(MessageType.EVALUATE), _context(True), evaluate)


def test_without_secure_aggregation_evaluation_passes_through():
    reply = secure_aggregation_mod(_message(MessageType.EVALUATE), _context(False), lambda m, c: "metrics")
    assert reply == "metrics"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, 2400),  # default: the number of training interactions it reports
        ({"client-weight": "uniform"}, 1),
        ({"secure-aggregation": True}, 1000),  # capped at secagg-max-weight
        ({"secure-aggregation": True, "client-weight": "uniform"}, 1),
        ({"user-dp": True}, 1),
    ],
)
def test_aggregation_weight_follows_client_weight(overrides, expected):
    config = parse_run_config(fused_run_config(overrides))
    assert aggregation_weight(config, 2400, declined=False) == expected
    assert aggregation_weight(config, 2400, declined=True) == 1  # a declined device's zeros count once
