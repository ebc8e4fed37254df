"""Run directory: nothing of an earlier run is lost, checkpoints round-trip."""

import json

import numpy as np

from server.run_dir import RunRecorder, load_checkpoint


def test_a_new_run_never_overwrites_an_earlier_one(tmp_path):
    first = RunRecorder(tmp_path / "run", {"seed": 1}, checkpoint_every=1)
    first.round_evaluated(1, {"test_sampled_hr@10": 0.5})
    second = RunRecorder(tmp_path / "run", {"seed": 2}, checkpoint_every=1)
    assert second.previous is not None and second.previous.parent == tmp_path
    assert '"test_sampled_hr@10": 0.5' in (second.previous / "metrics.jsonl").read_text()
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == ""


def test_checkpoints_every_n_rounds_and_final_round_trip(tmp_path):
    recorder = RunRecorder(tmp_path / "run", {}, checkpoint_every=2)
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(2, np.float32)]
    for server_round in (1, 2, 3):
        recorder.maybe_checkpoint(server_round, ("a", "b"), arrays, final=server_round == 3)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["final.npz", "round-00002.npz"]
    last, loaded = load_checkpoint(tmp_path / "run" / "checkpoints" / "final.npz")
    assert last == 3
    np.testing.assert_array_equal(loaded["a"], arrays[0])


def test_summary_picks_the_best_validation_round(tmp_path):
    recorder = RunRecorder(tmp_path / "run", {}, checkpoint_every=5)
    for server_round, val in ((1, 0.3), (2, 0.6), (3, 0.5)):
        recorder.round_evaluated(server_round, {"val_sampled_hr@10": val, "test_sampled_hr@10": val - 0.1})
    summary = recorder.finish()
    assert summary["best_validation_evaluation"]["round"] == 2
    assert summary["final_evaluation"]["round"] == 3
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rounds"] == 3
    assert (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0] == "round,phase,val_sampled_hr@10,test_sampled_hr@10"
