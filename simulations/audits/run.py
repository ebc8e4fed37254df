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

Rounds are ``num-server-rounds``.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from common.config import ConfigError, parse_run_config
from common.federation import slicer_cached
from simulations.audits.canary import record_level_canaries, user_level_canaries
from simulations.audits.interaction import interaction_inference
from simulations.audits.membership import membership_inference
from simulations.engine import fused_run_config

SCENARIOS = ("interaction-inference", "membership", "canary", "all")
AUDIT_DEFAULTS: dict[str, Any] = {
    "audit-seed": 0, "audit-max-targets": 100, "audit-holdout": 0.2,
    "audit-membership-settings": "no-dp,record-dp,user-dp", "audit-canaries": 100, "audit-canary-items": 8,
    "audit-guess-fraction": 0.5, "audit-beta": 0.05, "audit-canary-units": "user,record",
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
        common = dict(rounds=rounds, num_canaries=int(knobs["audit-canaries"]),
                      guess_fraction=float(knobs["audit-guess-fraction"]), beta=float(knobs["audit-beta"]), seed=seed)
        canary: dict[str, Any] = {}
        if "user" in units:
            canary["user-level"] = user_level_canaries(
                config, clients, items_per_canary=int(knobs["audit-canary-items"]), **common)  # type: ignore[arg-type]
        if "record" in units:
            canary["record-level"] = record_level_canaries(config, clients, **common)  # type: ignore[arg-type]
        report["audits"]["canary"] = canary
        save()
    save()
    print(f"[audit] wrote {target} ({report['seconds']:.0f}s)", flush=True)
    return report
