"""Audit 1: a curious server guesses which items a client trained on from what it receives.

In the spirit of Yuan et al. (WWW 2023), interaction-level membership inference against
federated recommenders. Ground truth: a client's positives in a round are all its
training interactions (every one is trained every local epoch). Why the attack works:
among the item rows a client trained, the positives' deltas point along the client's
(weighted) user embedding and the sampled negatives' against it, and negatives outnumber
positives (``num-negatives`` per positive, redrawn each epoch), so projecting the rows on
their top singular direction and taking the minority side separates them.

Four views of the same round, in two runs (without and with user-level DP):

* ``individual``: SecAgg+ off, the server reads the client's own upload (deltas and the
  touched-items vector; under user-level DP the clipped deltas and an all-ones vector,
  since the server adds its noise to the sum only);
* ``aggregate``: SecAgg+ on, the server only reads the round's weighted sum; under
  user-level DP that sum after the Gaussian noise (the released aggregate).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from common.config import FedRecConfig
from common.federation import ClientData
from common.updates import UpdateLayout
from simulations.audits.federation import RoundView, run_federation, user_dp_facts
from simulations.audits.metrics import guess_metrics, random_guess_metrics, roc_auc


def item_rows(layout: UpdateLayout, arrays: list[np.ndarray]) -> np.ndarray:
    """The item-indexed parts of an upload side by side: [num_items, total row width]."""
    parts = [a.reshape(layout.num_items, -1) for name, a in zip(layout.names, arrays, strict=True) if name in layout.item_rows]
    return np.concatenate(parts, axis=1).astype(np.float64)


def active_rows(rows: np.ndarray, touched: np.ndarray) -> np.ndarray:
    """Rows the upload shows as trained: the touched vector if it tells, else the nonzero rows.

    Under user-level DP the touched vector is all ones, but an untouched row's delta is
    still exactly zero in a single (un-noised) upload, so the rows themselves tell.
    """
    if np.ptp(touched) > 0:
        return touched > 0
    return np.linalg.norm(rows, axis=1) > 0


def projection_scores(rows: np.ndarray, active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(score per item, thresholded guess): projection on the top singular direction, minority side up.

    Inactive rows score below every active one and are never guessed.
    """
    scores = np.full(len(rows), -np.inf)
    guess = np.zeros(len(rows), dtype=bool)
    if active.sum() < 2:
        return np.where(active, 0.0, -1.0), active.copy()
    sub = rows[active]
    _, _, vt = np.linalg.svd(sub, full_matrices=False)
    proj = sub @ vt[0]
    if np.count_nonzero(proj > 0) > np.count_nonzero(proj < 0):
        proj = -proj  # positives are the minority side
    scores[active] = proj
    guess[active] = proj > 0
    floor = proj.min() - 1.0
    return np.where(active, scores, floor), guess


def attack_view(layout: UpdateLayout, arrays: list[np.ndarray], positives: np.ndarray) -> dict[str, dict[str, float]]:
    """Both attacks on one view of one client's round, against its true positives."""
    labels = np.zeros(layout.num_items, dtype=bool)
    labels[positives] = True
    rows, touched = item_rows(layout, arrays[:-1]), np.asarray(arrays[-1], dtype=np.float64)
    active = active_rows(rows, touched)
    scores, guess = projection_scores(rows, active)
    touched_score = touched if np.ptp(touched) > 0 else active.astype(np.float64)
    return {
        "projection": {"auc": roc_auc(scores, labels), **guess_metrics(guess, labels)},
        "touched": {"auc": roc_auc(touched_score, labels), **guess_metrics(touched_score > 0, labels)},
        "_sizes": {"positives": int(labels.sum()), "active_rows": int(active.sum())},
    }


def _mean_results(per_target: list[dict[str, dict[str, float]]], num_items: int) -> dict[str, Any]:
    """Macro averages over targets, with what random guessing would score."""
    out: dict[str, Any] = {}
    for attack in ("projection", "touched"):
        keys = per_target[0][attack].keys()
        out[attack] = {k: float(np.nanmean([t[attack][k] for t in per_target])) for k in keys}
    positives = float(np.mean([t["_sizes"]["positives"] for t in per_target]))
    out["active_rows"] = float(np.mean([t["_sizes"]["active_rows"] for t in per_target]))
    out["positives_per_target"] = positives
    out["random_guess"] = random_guess_metrics(round(out["projection"]["guessed"]), round(positives), num_items)
    out["base_rate"] = positives / num_items
    return out


def interaction_inference(
    config: FedRecConfig,
    clients: list[ClientData],
    *,
    rounds: int = 5,
    max_targets: int = 100,
    seed: int = 0,
    noise_seed: int | None = None,
) -> dict[str, Any]:
    """Train ``rounds`` rounds twice (no DP, user-level DP) and attack the last round's targets.

    Targets: up to ``max_targets`` of the last round's participants (seeded choice). The
    DP run uses the run-config's ``user-dp-*`` keys; both runs have record-level DP off.
    """
    started = time.perf_counter()
    num_items = clients[0].num_items
    results: dict[str, Any] = {"audit": "interaction-inference", "rounds": rounds, "clients": len(clients),
                               "num_items": num_items, "settings": {}}
    for dp_on in (False, True):
        run_config = dataclasses.replace(config, user_dp=dp_on, record_dp=False)
        seen: dict[str, RoundView] = {}

        def keep_last(view: RoundView, seen: dict[str, RoundView] = seen) -> None:  # this iteration's dict
            if view.round == rounds:
                seen["view"] = view

        fed = run_federation(run_config, clients, rounds, observe=keep_last, sampling_seed=seed,
                             noise_seed=noise_seed, progress=f"interaction {'user-dp' if dp_on else 'no-dp'}")
        if "view" not in seen:
            raise RuntimeError("no client was sampled in the attacked round")
        view = seen["view"]
        pick = np.random.default_rng(seed + 1)
        order = pick.permutation(len(view.participants))[:max_targets]
        individual, aggregate, prior = [], [], []
        total = np.zeros(num_items)
        for data in clients:
            total += np.bincount(data.train_items, minlength=num_items)
        for index in order:
            cid = view.participants[index]
            positives = np.unique(clients[cid].train_items)
            individual.append(attack_view(fed.layout, view.uploads[index], positives))
            aggregate.append(attack_view(fed.layout, view.released, positives))
            labels = np.zeros(num_items, dtype=bool)
            labels[positives] = True
            others = total - np.bincount(clients[cid].train_items, minlength=num_items)
            prior.append(roc_auc(others, labels))  # a population prior, no upload needed
        tag = "user-dp" if dp_on else "no-dp"
        extra: dict[str, Any] = {"clients_in_round": len(view.participants), "targets": len(order)}
        if fed.user_dp is not None:
            extra.update(user_dp_facts(fed.user_dp, rounds, config.user_dp_accountant))
        results["settings"][f"secagg-off/{tag}"] = {"view": "individual upload", **extra,
                                                    **_mean_results(individual, num_items)}
        results["settings"][f"secagg-on/{tag}"] = {
            "view": "round aggregate" + (" after the server's Gaussian noise" if dp_on else ""), **extra,
            **_mean_results(aggregate, num_items)}
        results[f"train_seconds_{tag}"] = fed.seconds
        results[f"popularity_prior_auc_{tag}"] = float(np.mean(prior))
    results["seconds"] = time.perf_counter() - started
    return results
