"""Audit 3: canaries and the one-run epsilon lower bound (Steinke, Nasr, Jagielski 2023).

m canaries, each included independently with probability 1/2, one training run, a score
per canary from the run's output, guesses on the top/bottom k, and the number of correct
guesses turned into an epsilon lower bound (:mod:`simulations.audits.bound`) placed next
to the accountant's epsilon at the same delta. A lower bound above the accountant's epsilon
would mean the implementation or the accounting is wrong.

Canaries match the privacy unit:

* user-level DP: a canary is a whole canary *client* (one user) whose interactions are
  its own dedicated items, appended to the catalogue. Excluded canaries are simply not in
  the federation. The mechanism is defined over the fixed population of real plus
  potential canary clients (Poisson rate and expected-clients denominator), so including
  a canary is exactly "add one client". Score: how far the canary's item rows moved from
  the public initial model along the canary's own expected update (only the canary pulls
  them as a positive; other clients touch them only as sampled negatives).
* record-level DP: a canary is one interaction (a real user, a dedicated canary item)
  added to that user's training data; canaries sit on distinct devices. Score: the user's
  final personal-model score for the canary item, minus its mean score over all canary
  items (the device's user rows are part of what DP-SGD protects). Opacus accounts one
  training *example*; under ``bce``/``bpr`` an interaction brings its sampled negatives
  too, redrawn every epoch from one stream, so nothing accounts one interaction and this
  audit has no claim to test (it still measures leakage). Under ``mse`` an interaction is
  one example and the per-example epsilon is the claim.

Every audit states its ceiling (the bound if every guess were right) and a verdict: a
bound at or below the claim only passes when the ceiling is above the claim.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch

from client.local import train_round
from common.config import ConfigError, FedRecConfig
from common.federation import ClientData, EvalData
from server.server_app import user_level_dp
from simulations.audits.bound import audit_from_scores, canaries_needed, guess_counts, verdict
from simulations.audits.federation import personal_model, run_federation
from simulations.audits.interaction import item_rows


def _empty_eval(negatives: int) -> EvalData:
    return EvalData(users=np.empty(0, np.int64), items=np.empty(0, np.int64),
                    negatives=np.empty((0, negatives), np.int64))


def with_catalogue(clients: list[ClientData], num_items: int) -> list[ClientData]:
    """The same clients over a catalogue grown to ``num_items`` (canary items appended)."""
    return [dataclasses.replace(c, num_items=num_items) for c in clients]


def canary_client(global_user: int, items: np.ndarray, num_items: int, eval_negatives: int) -> ClientData:
    """A one-user client whose only interactions are ``items``."""
    return ClientData(
        global_users=np.array([global_user], dtype=np.int64),
        train_users=np.zeros(len(items), dtype=np.int64),
        train_items=np.asarray(items, dtype=np.int64),
        train_ratings=np.ones(len(items), dtype=np.float32),
        test=_empty_eval(eval_negatives), validation=_empty_eval(eval_negatives), num_items=num_items,
    )


def canary_user_scores(config: FedRecConfig, canaries: list[ClientData], layout, initial: list[np.ndarray],
                       final: list[np.ndarray], base_items: int) -> np.ndarray:
    """How far each canary's item rows moved along the canary's own expected update.

    Every canary item row is pushed by the real clients that sample it as a negative, in
    much the same direction for all of them; that common movement (the mean over all
    canary rows, public) is removed first. What is left is projected on the canary's own
    update direction: the auditor wrote the canaries, so it runs each one's round-1
    training on the public initial model (the real ``train_round``, deterministic without
    record-level DP) and takes that update of its item rows.
    """
    moved = item_rows(layout, final) - item_rows(layout, initial)
    canary_rows = moved[base_items:]
    residual = canary_rows - canary_rows.mean(axis=0)
    scores = np.zeros(len(canaries))
    for j, canary in enumerate(canaries):
        result = train_round(config.model_config, config.train_config, canary, initial, None, seed=config.seed,
                             server_round=1, rowwise=True)
        rows = np.unique(canary.train_items)
        direction = item_rows(layout, result.upload[:-1])[rows].ravel()
        norm = np.linalg.norm(direction)
        scores[j] = float(residual[rows - base_items].ravel() @ direction / norm) if norm > 0 else 0.0
    return scores


def judged(audit: dict[str, Any], claimed: float | None, guess_fraction: float) -> dict[str, Any]:
    """The audit's verdict on ``claimed`` and, when its ceiling is too low, how many canaries it needs."""
    out = {"claimed_epsilon": claimed,
           "verdict": verdict(audit["epsilon_lower_bound"], audit["epsilon_ceiling"], claimed)}
    if claimed is not None and audit["epsilon_ceiling"] <= claimed:
        out["canaries_needed"] = canaries_needed(claimed, audit["delta"], audit["beta"], guess_fraction)
    return out


def user_level_canaries(
    config: FedRecConfig,
    clients: list[ClientData],
    *,
    rounds: int,
    num_canaries: int = 100,
    items_per_canary: int = 8,
    guess_fraction: float = 0.5,
    beta: float = 0.05,
    seed: int = 0,
    noise_seed: int | None = None,
    user_dp: bool = True,
) -> dict[str, Any]:
    """One run with canary clients; the bound at the accountant's delta vs the accountant's epsilon.

    With ``user_dp`` the run uses user-level DP with Poisson sampling (add/remove-one-client
    neighbouring, which is what including a canary client is); without it the same audit
    shows how much the attack sees when nothing protects the canaries (the control that
    says the attack works).
    """
    started = time.perf_counter()
    base_items = clients[0].num_items
    num_items = base_items + num_canaries * items_per_canary
    rng = np.random.default_rng(seed)
    included = rng.random(num_canaries) < 0.5
    first_user = max(int(c.global_users.max()) for c in clients if c.num_users) + 1
    canaries = [
        canary_client(first_user + j, base_items + items_per_canary * j + np.arange(items_per_canary), num_items,
                      config.eval_negatives)
        for j in range(num_canaries)
    ]
    population = with_catalogue(clients, num_items) + [c for c, keep in zip(canaries, included, strict=True) if keep]
    # The control without DP differs from the DP run only by clipping and noise: every client
    # weighs one, as under DP-FedAvg (example weights would drown a small canary client).
    run_config = dataclasses.replace(config, user_dp=user_dp, record_dp=False, client_weight="uniform",
                                     client_sampling="poisson" if user_dp else config.client_sampling)
    potential = len(clients) + num_canaries
    fed = run_federation(run_config, population, rounds, sampling_seed=seed + 1, noise_seed=noise_seed,
                         dp_num_clients=potential, progress=f"canary user-level {'user-dp' if user_dp else 'no-dp'}")
    scores = canary_user_scores(run_config, canaries, fed.layout, fed.initial, fed.shared, base_items)
    k_pos, k_neg = guess_counts(num_canaries, guess_fraction)
    # Without DP the bound is taken at the delta the DP run would be accounted at.
    accounted = fed.user_dp or user_level_dp(dataclasses.replace(run_config, user_dp=True, client_sampling="poisson"),
                                             potential)
    delta = accounted.target_delta
    audit = audit_from_scores(scores, included, k_pos, k_neg, delta, beta)
    out: dict[str, Any] = {
        "audit": "canary", "unit": "user (client)", "rounds": rounds, "real_clients": len(clients),
        "canary_items_per_canary": items_per_canary, "user_dp": user_dp, **audit,
        "score": "movement of the canary's item rows (minus the mean over canary rows) in the final global model along the canary's own round-1 update",
        "train_seconds": fed.seconds,
    }
    claimed = None
    if fed.user_dp is not None:
        claimed = fed.user_dp.epsilon(rounds, config.user_dp_accountant)
        out.update({
            "accountant_epsilon": claimed,
            "accountant_delta": fed.user_dp.target_delta, "accountant": config.user_dp_accountant,
            "noise_multiplier": fed.user_dp.noise_multiplier, "clipping_norm": fed.user_dp.clipping_norm,
            "sampling_rate": fed.user_dp.sampling_rate, "population": potential,
        })
    out.update(judged(audit, claimed, guess_fraction))
    out["seconds"] = time.perf_counter() - started
    return out


def examples_per_interaction(loss: str, num_negatives: int) -> int:
    """Training examples one interaction adds: itself and its negatives (bpr pairs them)."""
    return 1 if loss == "mse" else num_negatives + (0 if loss == "bpr" else 1)


def record_level_canaries(
    config: FedRecConfig,
    clients: list[ClientData],
    *,
    rounds: int,
    num_canaries: int = 100,
    guess_fraction: float = 0.5,
    beta: float = 0.05,
    seed: int = 0,
    record_dp: bool = True,
) -> dict[str, Any]:
    """One run with canary interactions on distinct devices; the bound vs the devices' Opacus epsilon."""
    started = time.perf_counter()
    if num_canaries > len(clients):
        raise ConfigError(f"audit-canaries={num_canaries}: record-level canaries sit on distinct devices and there are "
                          f"only {len(clients)}; lower audit-canaries or audit-canary-units='user'")
    base_items = clients[0].num_items
    num_items = base_items + num_canaries
    rng = np.random.default_rng(seed)
    included = rng.random(num_canaries) < 0.5
    hosts = rng.choice(len(clients), size=num_canaries, replace=False)
    population = with_catalogue(clients, num_items)
    for j, cid in enumerate(hosts):
        if included[j]:
            data = population[cid]
            population[cid] = dataclasses.replace(
                data, train_users=np.append(data.train_users, 0), train_items=np.append(data.train_items, base_items + j),
                train_ratings=np.append(data.train_ratings, np.float32(1.0)))
    run_config = dataclasses.replace(config, record_dp=record_dp, user_dp=False)
    fed = run_federation(run_config, population, rounds, sampling_seed=seed + 1,
                         progress=f"canary record-level {'record-dp' if record_dp else 'no-dp'}")
    scores = np.zeros(num_canaries)
    canary_items = torch.arange(base_items, num_items)
    with torch.no_grad():
        for j, cid in enumerate(hosts):
            model = personal_model(run_config, population[cid], fed.shared, fed.local_states.get(int(cid)))
            model.eval()
            row = model(torch.zeros(num_canaries, dtype=torch.long), canary_items).numpy()
            scores[j] = float(row[j] - row.mean())
    k_pos, k_neg = guess_counts(num_canaries, guess_fraction)
    delta = config.record_dp_delta
    audit = audit_from_scores(scores, included, k_pos, k_neg, delta, beta)
    examples = examples_per_interaction(config.loss, config.num_negatives)
    out: dict[str, Any] = {
        "audit": "canary", "unit": "interaction (record)", "rounds": rounds, "clients": len(clients),
        "record_dp": record_dp, **audit, "train_seconds": fed.seconds,
        "score": "host user's final score for the canary item minus its mean over all canary items",
        "devices_never_sampled": int(np.sum(fed.participation[hosts] == 0)),
        "examples_per_interaction": examples,
    }
    claimed = None
    if record_dp:
        eps = max(fed.record_epsilons.get(int(c), 0.0) for c in hosts)
        out.update({"accountant_epsilon_per_example": eps, "accountant_delta": delta})
        if examples == 1:
            claimed = out["accountant_epsilon"] = eps
        else:
            out["note"] = (f"Opacus accounts one training example; one interaction is {examples} examples whose "
                           "negatives are redrawn every epoch from one stream, so no epsilon covers an interaction "
                           "and this audit has no claim to test")
    out.update(judged(audit, claimed, guess_fraction))
    out["seconds"] = time.perf_counter() - started
    return out
