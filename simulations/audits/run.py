"""``run_audits``: one entry point for the empirical privacy audits, writing ``audit.json``.

The dataset and every training setting come from run-config overrides, exactly like
``fedrec simulate`` (``parse_run_config(fused_run_config(overrides))``; the embedded
synthetic dataset by default). Keys starting with ``audit-`` are the audits' own knobs and
are taken out before the run-config is validated:

| key | default | meaning |
|---|---|---|
| ``audit-seed`` | 0 | canary draws, hold-out split, client sampling, targets |
| ``audit-max-targets`` | 100 | interaction inference: clients attacked in the last round |
| ``audit-holdout`` | 0.2 | membership: share of each user's interactions held out |
| ``audit-membership-settings`` | ``no-dp,record-dp,user-dp`` | membership: which runs |
| ``audit-canaries`` | 100 | canary: number of canaries (each in with probability 1/2) |
| ``audit-canary-items`` | 8 | canary: dedicated items per canary user |
| ``audit-guess-fraction`` | 0.5 | canary: share of canaries guessed (half top, half bottom) |
| ``audit-beta`` | 0.05 | canary: the bound holds with confidence 1 - beta |
| ``audit-canary-units`` | ``user,record`` | canary: user-level and/or record-level canaries |
| ``audit-canary-dp`` | ``on,off`` | canary: with DP (tests the claim) and/or without (shows the attack works) |

Rounds are ``num-server-rounds``. Each canary audit prints its bound, its ceiling (the bound
if every guess were right), the accountant's epsilon and delta, and a verdict; a ceiling at
or below the claim makes the verdict "inconclusive", never "passed".
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from common.config import ConfigError, FedRecConfig, parse_run_config
from common.federation import ClientData, slicer_cached
from simulations.audits.canary import record_level_canaries, user_level_canaries
from simulations.audits.interaction import interaction_inference
from simulations.audits.membership import membership_inference
from simulations.engine import fused_run_config

SCENARIOS = ("interaction-inference", "membership", "canary", "all")
AUDIT_DEFAULTS: dict[str, Any] = {
    "audit-seed": 0, "audit-max-targets": 100, "audit-holdout": 0.2,
    "audit-membership-settings": "no-dp,record-dp,user-dp", "audit-canaries": 100, "audit-canary-items": 8,
    "audit-guess-fraction": 0.5, "audit-beta": 0.05, "audit-canary-units": "user,record", "audit-canary-dp": "on,off",
}


def split_overrides(overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run-config overrides, audit knobs with defaults filled in); unknown audit keys are an error."""
    knobs = {k: v for k, v in overrides.items() if k.startswith("audit-")}
    unknown = sorted(set(knobs) - set(AUDIT_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown audit key(s): {', '.join(unknown)}; valid: {', '.join(AUDIT_DEFAULTS)}")
    run = {k: v for k, v in overrides.items() if not k.startswith("audit-")}
    return run, {**AUDIT_DEFAULTS, **knobs}


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in str(text).split(",") if part.strip())


def canary_line(name: str, r: Mapping[str, Any]) -> str:
    """One console line per canary audit: bound, ceiling, claim with its delta, verdict."""
    claim = r.get("claimed_epsilon")
    text = (f"[audit] canary {name}: {r['correct']} of {r['guesses']} guesses correct, epsilon lower bound "
            f"{r['epsilon_lower_bound']:.3f}, ceiling {r['epsilon_ceiling']:.3f}, ")
    if claim is not None:
        text += f"accountant epsilon {claim:.3f} at delta {r['accountant_delta']:.3g}"
    elif r.get("accountant_epsilon_per_example") is not None:
        text += (f"no epsilon for one interaction (per example {r['accountant_epsilon_per_example']:.3f} "
                 f"at delta {r['accountant_delta']:.3g})")
    else:
        text += f"no DP (bound at delta {r['delta']:.3g})"
    text += f" ({1 - r['beta']:.0%} confidence): {r['verdict']}"
    if "canaries_needed" in r:
        needed = r["canaries_needed"]
        text += (f"; the claim needs {needed} canaries at this guess fraction" if needed is not None
                 else f"; no number of canaries reaches the claim at delta {r['delta']:.3g}")
    return text


def canary_modes(knobs: Mapping[str, Any]) -> tuple[str, ...]:
    """``audit-canary-dp`` as a tuple of "on"/"off" (a clear error for anything else)."""
    modes = _names(knobs["audit-canary-dp"])
    if not modes or not set(modes) <= {"on", "off"}:
        raise ConfigError(f"audit-canary-dp={knobs['audit-canary-dp']!r}: expected 'on', 'off' or 'on,off'")
    return modes


def canary_audits(config: FedRecConfig, clients: list[ClientData], knobs: Mapping[str, Any], rounds: int,
                  seed: int) -> dict[str, Any]:
    """The canary audits ``audit-canary-units`` x ``audit-canary-dp`` asks for, keyed like ``user-level/no-dp``."""
    units, modes = _names(knobs["audit-canary-units"]), canary_modes(knobs)
    common = dict(rounds=rounds, num_canaries=int(knobs["audit-canaries"]),
                  guess_fraction=float(knobs["audit-guess-fraction"]), beta=float(knobs["audit-beta"]), seed=seed)
    out: dict[str, Any] = {}
    for mode in modes:
        suffix = "" if mode == "on" else "/no-dp"
        if "user" in units:
            out["user-level" + suffix] = user_level_canaries(
                config, clients, items_per_canary=int(knobs["audit-canary-items"]), user_dp=mode == "on",
                **common)  # type: ignore[arg-type]
        if "record" in units:
            out["record-level" + suffix] = record_level_canaries(
                config, clients, record_dp=mode == "on", **common)  # type: ignore[arg-type]
    for name, result in out.items():
        print(canary_line(name, result), flush=True)
    return out


def run_audits(scenario: str, overrides: Mapping[str, Any], out_path: str | Path) -> dict[str, Any]:
    """Run ``scenario`` (one of :data:`SCENARIOS`) and write the results to ``audit.json``.

    ``out_path`` is a directory (``audit.json`` is written inside) or a path ending in ``.json``.
    """
    if scenario not in SCENARIOS:
        raise ConfigError(f"scenario must be one of {', '.join(SCENARIOS)}; got {scenario!r}")
    torch.set_num_threads(1)
    started = time.perf_counter()
    run_overrides, knobs = split_overrides(overrides)
    config = parse_run_config(fused_run_config(run_overrides))
    slicer = slicer_cached(config)
    clients = [slicer.client(i) for i in range(len(slicer))]
    rounds = config.num_server_rounds
    seed = int(knobs["audit-seed"])
    print(f"[audit] {scenario} on {config.dataset}: {len(clients)} clients, {slicer.prepared.num_items} items, "
          f"{rounds} rounds, model {config.model}", flush=True)
    report: dict[str, Any] = {
        "scenario": scenario, "overrides": dict(overrides), "dataset": config.dataset, "model": config.model,
        "clients": len(clients), "items": slicer.prepared.num_items, "rounds": rounds,
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "audits": {},
    }
    units = _names(knobs["audit-canary-units"])
    if scenario in ("canary", "all"):
        canary_modes(knobs)
    if scenario in ("canary", "all") and "record" in units and int(knobs["audit-canaries"]) > len(clients):
        raise ConfigError(f"audit-canaries={knobs['audit-canaries']}: record-level canaries sit on distinct devices "
                          f"and there are only {len(clients)}; lower audit-canaries or set audit-canary-units='user'")
    out = Path(out_path)
    target = out if out.suffix == ".json" else out / "audit.json"
    target.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        report["seconds"] = time.perf_counter() - started
        target.write_text(json.dumps(report, indent=2, default=float))

    if scenario in ("interaction-inference", "all"):
        report["audits"]["interaction-inference"] = interaction_inference(
            config, clients, rounds=rounds, max_targets=int(knobs["audit-max-targets"]), seed=seed)
        save()
    if scenario in ("membership", "all"):
        report["audits"]["membership"] = membership_inference(
            config, clients, rounds=rounds, settings=_names(knobs["audit-membership-settings"]),
            holdout=float(knobs["audit-holdout"]), seed=seed)
        save()
    if scenario in ("canary", "all"):
        report["audits"]["canary"] = canary_audits(config, clients, knobs, rounds, seed)
        save()
    save()
    print(f"[audit] wrote {target} ({report['seconds']:.0f}s)", flush=True)
    return report
