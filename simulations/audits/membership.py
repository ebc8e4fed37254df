"""Audit 2: membership inference on the final model (members vs held-out interactions).

Before training, a random share of each user's training interactions is held out; the
federation trains on the rest. Members are the interactions trained on, non-members the
held-out interactions of the same users (same users, same item distribution, so the
attack cannot win on who the user is or how popular an item is per se). The attacker
holds a user's final personal model (the global shared part and the device's user rows,
e.g. through the scores behind its recommendations) and thresholds its score; with the
bce or bpr loss the per-interaction loss is a decreasing function of the score, so the
loss-threshold attack ranks identically. A second attacker calibrates per user (score
minus the user's mean score over the catalogue), which removes the users' scale.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch

from common.config import FedRecConfig
from common.federation import ClientData
from simulations.audits.federation import personal_model, run_federation, user_dp_facts
from simulations.audits.metrics import roc_auc, tpr_at_fpr

SETTINGS = ("no-dp", "record-dp", "user-dp")


def hold_out(data: ClientData, share: float, rng: np.random.Generator) -> tuple[ClientData, np.ndarray]:
    """(client with ``share`` of each user's training rows removed, mask of removed rows).

    Every user keeps at least one training row.
    """
    removed = np.zeros(len(data.train_items), dtype=bool)
    for user in range(data.num_users):
        rows = np.flatnonzero(data.train_users == user)
        count = min(int(round(share * len(rows))), len(rows) - 1)
        if count > 0:
            removed[rng.choice(rows, size=count, replace=False)] = True
    kept = ~removed
    reduced = dataclasses.replace(
        data, train_users=data.train_users[kept], train_items=data.train_items[kept],
        train_ratings=data.train_ratings[kept])
    return reduced, removed


def setting_config(config: FedRecConfig, setting: str) -> FedRecConfig:
    """The run-config with only the named DP switch on."""
    if setting not in SETTINGS:
        raise ValueError(f"membership setting must be one of {', '.join(SETTINGS)}; got {setting!r}")
    return dataclasses.replace(config, user_dp=setting == "user-dp", record_dp=setting == "record-dp")


@torch.no_grad()
def membership_scores(config: FedRecConfig, data: ClientData, shared: list[np.ndarray],
                      local_state: dict[str, np.ndarray], users: np.ndarray, items: np.ndarray,
                      ratings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(raw score, per-user calibrated score) of (local user, item) pairs under the final model."""
    model = personal_model(config, data, shared, local_state)
    model.eval()
    pred = model(torch.from_numpy(users), torch.from_numpy(items)).numpy().astype(np.float64)
    if config.loss == "mse":
        pred = -((pred - ratings) ** 2)  # negative squared error: higher = fits better
        return pred, pred
    all_scores = model.score_all_items(torch.arange(data.num_users)).numpy().astype(np.float64)
    return pred, pred - all_scores.mean(axis=1)[users]


def membership_inference(
    config: FedRecConfig,
    clients: list[ClientData],
    *,
    rounds: int,
    settings: tuple[str, ...] = SETTINGS,
    holdout: float = 0.2,
    seed: int = 0,
) -> dict[str, Any]:
    """Hold out ``holdout`` of each user's interactions, train per setting, attack the final model."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    split = [hold_out(c, holdout, rng) for c in clients]
    reduced = [s[0] for s in split]
    results: dict[str, Any] = {"audit": "membership", "rounds": rounds, "clients": len(clients),
                               "holdout_share": holdout, "settings": {}}
    for setting in settings:
        run_config = setting_config(config, setting)
        fed = run_federation(run_config, reduced, rounds, sampling_seed=seed, progress=f"membership {setting}")
        raw, calibrated, labels = [], [], []
        scored_clients = 0
        for cid, (data, removed) in enumerate(split):
            state = fed.local_states.get(cid)
            if state is None or not removed.any():
                continue  # never trained: its user rows are the initial ones
            original = clients[cid]
            users, items, ratings = original.train_users, original.train_items, original.train_ratings
            r, c = membership_scores(run_config, data, fed.shared, state, users, items, ratings)
            raw.append(r)
            calibrated.append(c)
            labels.append(~removed)
            scored_clients += 1
        raw_all, cal_all, lab = np.concatenate(raw), np.concatenate(calibrated), np.concatenate(labels)
        entry: dict[str, Any] = {
            "members": int(lab.sum()), "non_members": int((~lab).sum()), "clients_scored": scored_clients,
            "score": {"auc": roc_auc(raw_all, lab), "tpr@1%fpr": tpr_at_fpr(raw_all, lab, 0.01)},
            "calibrated_score": {"auc": roc_auc(cal_all, lab), "tpr@1%fpr": tpr_at_fpr(cal_all, lab, 0.01)},
            "random_guess": {"auc": 0.5, "tpr@1%fpr": 0.01},
            "train_seconds": fed.seconds,
        }
        if fed.user_dp is not None:
            entry.update(user_dp_facts(fed.user_dp, rounds, config.user_dp_accountant))
        if fed.record_epsilons:
            spent = list(fed.record_epsilons.values())
            entry.update({"record_epsilon_max": max(spent), "record_epsilon_mean": float(np.mean(spent)),
                          "record_delta": config.record_dp_delta,
                          "record_noise_multiplier": config.record_dp_noise_multiplier,
                          "record_unit": "one training example; an interaction is 1 + num-negatives examples"})
        results["settings"][setting] = entry
    results["seconds"] = time.perf_counter() - started
    return results
