"""What every request of a round carries, and the global model as it travels to devices."""

from __future__ import annotations

from flwr.common import Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays

from common.config import ROUND_ATTEMPT_KEY
from common.updates import POPULAR_ITEMS_KEY, for_transport


def round_config(server_round: int, attempt: int, popular: bytes | None) -> dict[str, Scalar]:
    """The round's number, the attempt of a retried round, and (once known) the popular items."""
    config: dict[str, Scalar] = {"server-round": server_round}
    if attempt:  # a retried round: devices know it is another try (client.fleet draws anew)
        config[ROUND_ATTEMPT_KEY] = attempt
    if popular is not None:
        config[POPULAR_ITEMS_KEY] = popular
    return config


def for_transport_parameters(parameters: Parameters, transport_dtype: str) -> Parameters:
    """The global model as it travels to devices (``transport-dtype``); the server keeps float32."""
    if transport_dtype == "float32":
        return parameters
    return ndarrays_to_parameters(for_transport(parameters_to_ndarrays(parameters), transport_dtype))
