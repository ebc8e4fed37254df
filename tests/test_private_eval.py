"""The private evaluation vector: what SecAgg+ sums in place of the devices' evaluation replies.

The round trip goes through Flower's own quantization (``secaggplus_mod`` quantizes each
device's weighted vector, ``SecAggPlusWorkflow`` dequantizes the sum), so the sums the
server decodes are checked against the path they really take, masks aside (they cancel).
"""

import numpy as np
import pytest
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from common.config import parse_run_config
from common.evaluation import ListMetrics
from common.private_eval import EvalVectorLayout, layout_for, private_metrics
from simulations.engine import fused_run_config

CLIP, LEVELS = 8.0, 2**22


def _layout(max_users: int = 1, num_items: int = 6) -> EvalVectorLayout:
    return EvalVectorLayout.build(ListMetrics(activity_bands=(50, 150)), has_catalogue=True, num_items=num_items,
                                  max_users=max_users, clipping_range=CLIP)


def _device(hit: float, ndcg: float, group: str, items: list[int]) -> dict:
    return {"test_count": 1.0, "test_sampled_hr@10": hit, "test_sampled_ndcg@10": ndcg, "test_ild@10": 1.7,
            f"grp/activity={group}/count": 1.0, f"grp/activity={group}/sampled_hr@10": hit,
            "rec_items": np.asarray(items, "<i4").tobytes()}


def secagg_mean(vectors: list[np.ndarray]) -> np.ndarray:
    """What SecAggPlusWorkflow hands aggregate_fit for weight-1 devices and max-weight 1 (masks cancel)."""
    total = sum(quantize([v], CLIP, LEVELS)[0].astype(np.int64) for v in vectors)
    summed = dequantize([total], CLIP, LEVELS)[0] - (len(vectors) - 1) * CLIP
    return summed / len(vectors)


def test_sums_survive_flowers_quantization_and_name_no_single_device():
    layout = _layout()
    devices = [_device(1.0, 0.5, "<=50", [0, 1, 2]), _device(0.0, 0.0, "51-150", [1, 2, 3]),
               _device(1.0, 1 / np.log2(3), "<=50", [2, 3, 4])]
    sums = layout.decode(secagg_mean([layout.encode(d) for d in devices]), len(devices))
    assert sums["test_count"] == 3 and sums["grp/activity=<=50/count"] == 2 and sums["grp/activity=>150/count"] == 0
    assert sums["test_sampled_hr@10"] == pytest.approx(2.0, abs=1e-4)
    assert sums["test_sampled_ndcg@10"] == pytest.approx(0.5 + 1 / np.log2(3), abs=1e-4)
    assert sums["test_ild@10"] == pytest.approx(3 * 1.7, abs=1e-4)
    assert sums["catalogue_counts"].tolist() == [1, 2, 3, 2, 1, 0]


def test_the_largest_honest_value_is_not_clipped_and_a_larger_one_is_refused():
    layout = _layout(max_users=4)
    kiosk = {"test_count": 4.0, "test_ild@10": 4 * 2.0, "grp/gender=F/count": 4.0}
    assert layout.encode(kiosk).max() == pytest.approx(CLIP)
    assert layout.decode(secagg_mean([layout.encode(kiosk)] * 2), 2)["test_count"] == 8
    with pytest.raises(ValueError, match="more users than the run-config allows"):
        layout.encode({"test_count": 9.0})  # 9 users x 2 > what the clipping range holds for 4
    with pytest.raises(ValueError, match="not one of the run's possible groups"):
        layout.encode({"grp/zip=123/count": 1.0})


def test_the_layout_depends_on_the_run_config_only_and_drops_item_counts_under_dp():
    plain = parse_run_config(fused_run_config({"secure-aggregation": True}))
    dp = parse_run_config(fused_run_config({"secure-aggregation": True, "user-dp": True}))
    kiosks = parse_run_config(fused_run_config({"secure-aggregation": True, "partitioning": "group",
                                                "users-per-client": 7}))
    assert layout_for(plain, has_catalogue=False, num_items=30).num_items == 30
    assert layout_for(dp, has_catalogue=False, num_items=30).num_items == 0
    assert layout_for(kiosks, has_catalogue=False, num_items=30).max_users == 7


def test_a_private_device_without_secure_aggregation_sends_scalar_sums_only():
    sent = private_metrics(_device(1.0, 0.5, "<=50", [0, 1, 2]))
    assert sent == {"test_count": 1.0, "test_sampled_hr@10": 1.0, "test_sampled_ndcg@10": 0.5, "test_ild@10": 1.7}
