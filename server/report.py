"""The privacy audit report: every fact read from a run directory, none typed in.

``build_report`` turns what a run left behind (``config.json``, ``privacy.json``,
``dataset.json``, ``metrics.jsonl``, ``traffic.jsonl``, ``summary.json`` and, when an audit
ran, ``audit.json``) into one JSON document that validates against ``report.schema.json``;
``server.report_html`` renders the same document for people. User-level epsilon is also
recomputed here, independently of the run's own accounting code: this module builds the
dp-accounting events itself from the recorded parameters (noise multiplier, sampling,
population, delta, neighbouring relation) and the rounds the run directory shows, so a
reader can see that the per-round figures are the accountant's and not a copy of a number
in a file, and a record changed after the run no longer agrees with itself.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Iterable

import dp_accounting
from dp_accounting import pld, rdp

from common.errors import DataError
from server.frontier import mode_of, trajectory
from server.report_disclosure import disclosure
from server.run_dir import atomic_write_bytes, config_hash, switched_on

SCHEMA_PATH = Path(__file__).with_name("report.schema.json")
SCHEMA_VERSION = 1


# --- reading the run directory --------------------------------------------------------
def _read_json(path: Path, *, required: bool) -> Any:
    if not path.exists():
        if required:
            raise DataError("missing; not a fedrec run directory (or the run never started)", path)
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"not valid JSON: {err.msg}", path, err.lineno) from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"not a JSON object per line: {err.msg}", path, number) from None
        if not isinstance(row, dict):
            raise DataError("expected a JSON object on this line", path, number)
        rows.append(row)
    return rows


# --- facts -----------------------------------------------------------------------------
def protections(run_config: dict[str, Any], privacy: dict[str, Any]) -> dict[str, Any]:
    """Which protections the run had on, with what the run directory says about each."""
    transport = privacy.get("transport") or {}
    secagg = privacy.get("secure_aggregation_parameters")
    if transport.get("network") is False:
        tls = {"status": "not applicable", "detail": "in-process simulation: clients and server exchange no network traffic"}
        auth = dict(tls)
    elif transport:
        note = (
            "set on the SuperLink, outside the ServerApp, so the run directory cannot prove it; "
            "`fedrec superlink` turns it on unless --no-supernode-auth / no certificates are given"
        )
        tls = {"status": "not recorded", "detail": "TLS is " + note}
        auth = {"status": "not recorded", "detail": "SuperNode authentication is " + note}
    else:
        tls = auth = {"status": "not recorded", "detail": "this run directory predates transport records"}
    return {
        "record_level_dp": {"on": switched_on(run_config, "record-dp"), "parameters": privacy.get("record_level")},
        "user_level_dp": {"on": switched_on(run_config, "user-dp"), "parameters": privacy.get("user_level")},
        "secure_aggregation": {
            "on": bool(privacy.get("secure_aggregation")),
            "parameters": secagg,
            "limitations": privacy.get("secure_aggregation_limitations"),
        },
        "tls": tls,
        "supernode_authentication": auth,
        "engine": transport.get("engine", "unknown"),
    }


def threat_model(protected: dict[str, Any]) -> list[dict[str, str]]:
    """Who could attack, what they see, and what this run did about it, in plain words."""
    user_dp, record_dp = protected["user_level_dp"]["on"], protected["record_level_dp"]["on"]
    secagg = protected["secure_aggregation"]["on"]
    server_sees = (
        "only the masked sum of each round's updates (SecAgg+); no single device's update"
        if secagg
        else "every device's individual update: which item rows it changed and how, which names every item the "
        "user trained on (see the opening of this report)"
    )
    dp_words = []
    if user_dp and secagg:
        dp_words.append("user-level DP bounds what the released model reveals about any one user (the server adds "
                        "the noise to the masked sum, so it could keep the noise-free sum of a round)")
    elif user_dp:
        dp_words.append("user-level DP bounds what the released model reveals about any one user, but NOT what this "
                        "server learns: it adds the noise itself and sees each device's clipped update before that, "
                        "including which item rows it changed; only SecAgg+ hides single updates from the server")
    if record_dp:
        dp_words.append("record-level DP on each device bounds what its update reveals about any one training "
                        "example (an interaction or one sampled negative); no bound is claimed for a whole interaction")
    return [
        {
            "adversary": "honest-but-curious server",
            "can": "follows the protocol but studies everything it receives to learn about users",
            "sees": server_sees + ". User embeddings and raw interaction lists never leave a device; what did "
            "leave is listed field by field under \"What the server received\".",
            "protection": "; ".join(dp_words + (["SecAgg+ hides individual updates"] if secagg else []))
            or "none: no differential privacy and no secure aggregation",
        },
        {
            "adversary": "malicious clients",
            "can": "send crafted updates (poisoning) or study the global model they receive to infer other users' data",
            "sees": "the global shared model each round they take part in",
            "protection": (
                "the server rejects malformed updates (wrong shapes, NaN/Inf"
                + (", norms above the clipping bound" if user_dp else "")
                + "); "
                + (
                    "user-level DP bounds what the global model reveals about any other user"
                    if user_dp
                    else "nothing bounds what the global model reveals about other users"
                )
                + "; no robust aggregation against poisoning was configured"
            ),
        },
        {
            "adversary": "network attacker",
            "can": "reads or alters traffic between devices and the SuperLink, or impersonates a device",
            "sees": "nothing in simulation" if protected["engine"] == "simulation" else "the traffic, unless TLS is on",
            "protection": f"TLS: {protected['tls']['status']}; SuperNode authentication: "
            f"{protected['supernode_authentication']['status']}",
        },
    ]


def _rounds(metrics: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per round: privacy spent (fit rows) next to utility (evaluate rows)."""
    by_round: dict[int, dict[str, Any]] = {}
    keep_fit = ("clients_ok", "clients_failed", "clients_rejected", "user_epsilon", "user_delta", "record_epsilon_max",
                "record_epsilon_mean", "record_delta", "record_dp_declined")
    keep_eval = {"test_sampled_hr@10": "hr@10", "test_sampled_ndcg@10": "ndcg@10", "test_full_hr@10": "full_hr@10",
                 "test_full_ndcg@10": "full_ndcg@10", "eval_clients": "eval_clients"}
    for row in metrics:
        entry = by_round.setdefault(int(row["round"]), {"round": int(row["round"])})
        if row.get("phase") == "fit":
            entry.update({k: row[k] for k in keep_fit if row.get(k) is not None})
        elif row.get("phase") == "evaluate":
            entry.update({new: row[old] for old, new in keep_eval.items() if row.get(old) is not None})
            if row.get("eval_population"):
                entry["eval_population"] = row["eval_population"]
    return [by_round[r] for r in sorted(by_round)]


NEIGHBOURING = {
    "add or remove one client": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    "replace one client": dp_accounting.NeighboringRelation.REPLACE_ONE,
}


def user_round_event(params: dict[str, Any], first: bool = False) -> dp_accounting.DpEvent:
    """One round of DP-FedAvg as the recorded parameters describe it (``first``: round 1's, ``first_round_noise`` x z).

    Poisson: each client joins with probability q, Gaussian noise of z sensitivities.
    Fixed: m of N without replacement under replace-one neighbouring, where swapping one
    client's clipped update moves the sum by up to 2 C, so the noise is z / 2 sensitivities.
    """
    gaussian_z = float(params["noise_multiplier"]) * (float(params.get("first_round_noise", 1.0)) if first else 1.0)
    if params["sampling"] == "poisson":
        return dp_accounting.PoissonSampledDpEvent(float(params["sampling_rate"]), dp_accounting.GaussianDpEvent(gaussian_z))
    population, sample = int(params["num_clients"]), int(round(float(params["clients_per_round"])))
    return dp_accounting.SampledWithoutReplacementDpEvent(population, sample, dp_accounting.GaussianDpEvent(gaussian_z / 2))


def recompute_user_epsilon(params: dict[str, Any], rounds: int) -> float | None:
    """Epsilon of ``rounds`` rounds at the recorded delta, from dp-accounting events built here.

    None when the record does not describe a mechanism dp-accounting can account (a
    missing or unknown field, an accountant that does not cover the sampling).
    """
    if rounds <= 0:
        return 0.0
    try:
        relation = NEIGHBOURING[params["neighbouring"]]
        if params["accountant"] == "rdp":
            accountant: dp_accounting.PrivacyAccountant = rdp.RdpAccountant(neighboring_relation=relation)
        elif params["accountant"] == "pld":
            accountant = pld.PLDAccountant(neighboring_relation=relation)
        else:
            return None
        first, later = user_round_event(params, first=True), user_round_event(params)
        if not (accountant.supports(first) and accountant.supports(later)):
            return None
        accountant.compose(first)
        if rounds > 1:
            accountant.compose(later, rounds - 1)
        return float(accountant.get_epsilon(float(params["delta"])))
    except (KeyError, TypeError, ValueError):
        return None


def rounds_run(rounds: list[dict[str, Any]], summary: dict[str, Any] | None) -> int:
    """The last round the run directory shows evidence of (a metrics row or the summary)."""
    return max([r["round"] for r in rounds] + [int((summary or {}).get("rounds") or 0)], default=0)


def guarantees(
    protected: dict[str, Any], rounds: list[dict[str, Any]], traffic: list[dict[str, Any]], ran: int | None = None
) -> dict:
    """The (epsilon, delta) statements of this run: as its accountants computed them, and recomputed here.

    ``ran``: the rounds the run directory shows (default: the last round in ``rounds``).
    """
    out: dict[str, Any] = {"user_level": None, "record_level": None}
    fit_rounds = [r for r in rounds if "clients_ok" in r]
    user = protected["user_level_dp"]["parameters"]
    if protected["user_level_dp"]["on"] and user:
        out["user_level"] = user_guarantee(user, fit_rounds, rounds_run(rounds, None) if ran is None else ran)
    record = protected["record_level_dp"]["parameters"]
    if protected["record_level_dp"]["on"] and record:
        per_client: dict[str, float] = {}
        declined_clients: set[str] = set()
        for row in traffic:
            node = str(row.get("node_id"))
            if row.get("record_epsilon") is not None:
                per_client[node] = max(per_client.get(node, 0.0), float(row["record_epsilon"]))
            if float(row.get("record_dp_declined") or 0) > 0:
                declined_clients.add(node)
        finals = sorted(per_client.values())
        out["record_level"] = {
            "epsilon_max": finals[-1] if finals else 0.0,
            "epsilon_mean": sum(finals) / len(finals) if finals else 0.0,
            "epsilon_median": finals[len(finals) // 2] if finals else 0.0,
            "delta": record["delta"],
            "accountant": record["accountant"],
            "noise_multiplier": record["noise_multiplier"],
            "max_grad_norm": record["max_grad_norm"],
            "target_epsilon": record.get("target_epsilon"),
            "epsilon_budget_per_device": record.get("epsilon_budget_per_device"),
            "clients_reporting": len(finals),
            "clients_hit_budget": len(declined_clients),
            "declines": int(sum(r.get("record_dp_declined", 0) for r in fit_rounds)),
            "noise_generator": record.get("noise_generator"),
        }
    return out


def user_guarantee(user: dict[str, Any], fit_rounds: list[dict[str, Any]], ran: int) -> dict[str, Any]:
    """The run's own user-level epsilon next to this module's recomputation over the rounds that ran."""
    spent = [r for r in fit_rounds if r.get("user_epsilon") is not None]
    final = float(spent[-1]["user_epsilon"]) if spent else 0.0
    recomputed = recompute_user_epsilon(user, ran)
    num_clients = int(user.get("num_clients") or 0)
    return {
        "epsilon": final,
        "delta": user["delta"],
        "accountant": user["accountant"],
        "noise_multiplier": user["noise_multiplier"],
        "first_round_noise": float(user.get("first_round_noise", 1.0)),
        "clipping_norm": user["clipping_norm"],
        "sampling": user["sampling"],
        "sampling_rate": user["sampling_rate"],
        "num_clients": num_clients,
        "rounds": ran,
        "epsilon_recorded_after_round": spent[-1]["round"] if spent else 0,
        "neighbouring": user.get("neighbouring"),
        "epsilon_budget": user.get("epsilon_budget"),
        "stop_reason": user.get("stop_reason"),
        "recomputed_epsilon": recomputed,
        "recomputation": "dp-accounting events built by the report from privacy.json and the rounds in "
        "metrics.jsonl / summary.json (not the run's accounting code)",
        "recomputation_matches": recomputed is not None and math.isclose(recomputed, final, rel_tol=1e-6, abs_tol=1e-9),
        "delta_below_one_over_n": num_clients > 0 and float(user["delta"]) < 1.0 / num_clients,
        "noise_generator": user.get("noise_generator"),
    }


def server_could_read(protected: dict[str, Any]) -> str | None:
    """Without SecAgg+: what the server read in every device's own upload (None with SecAgg+)."""
    if protected["secure_aggregation"]["on"]:
        return None
    user_dp, record_dp = protected["user_level_dp"]["on"], protected["record_level_dp"]["on"]
    opening = "Without secure aggregation the server read every device's own upload, in the clear. "
    if record_dp:
        return opening + (
            "Each upload is a DP-SGD result (noise on every item row, touched-items vector all ones), so it bounds "
            "what one training example reveals, not what the user as a whole does; the server also read each "
            "device's example count and training metrics."
        )
    names = (
        "The upload names the items its user trained on: "
        + ("the touched-items vector is all ones, but the rows of items the user did not train are exactly zero "
           "in the clipped update, which the server read before adding its noise"
           if user_dp else
           "the touched-items vector is 1 exactly for them, and only their rows are non-zero")
        + "; that set holds every interaction the user trained on (with the sampled negatives), and the "
        "direction of each row's change tells the two apart. "
    )
    return opening + names + "The server also read each device's example count and training metrics."


def headline(protected: dict[str, Any], guaranteed: dict[str, Any]) -> dict[str, Any]:
    """The sentence at the top of the report: what the server could read, protected or not, and by what."""
    read = server_could_read(protected)
    opening = f"{read} " if read else ""
    parts = []
    if guaranteed["user_level"]:
        g = guaranteed["user_level"]
        checked = (f"recomputed by the report: {g['recomputed_epsilon']:.3g}" if g["recomputation_matches"] else
                   f"UNVERIFIED: the report recomputes {_fmt_number(g['recomputed_epsilon'])} from the recorded "
                   "parameters")
        parts.append(f"user-level DP (epsilon {g['epsilon']:.3g} at delta {g['delta']:.3g}, {g['accountant']} "
                     f"accountant; {checked})")
    if guaranteed["record_level"]:
        g = guaranteed["record_level"]
        parts.append(f"record-level DP on each device (epsilon up to {g['epsilon_max']:.3g} at delta {g['delta']:.3g})")
    if protected["secure_aggregation"]["on"]:
        params = protected["secure_aggregation"]["parameters"] or {}
        parts.append(
            f"SecAgg+ (shares {params.get('num_shares', '?')}, reconstruction threshold "
            f"{params.get('reconstruction_threshold', '?')})"
        )
    if not parts:
        return {
            "protected": False,
            "server_could_read": read,
            "text": opening + "This run had NO privacy protection: no differential privacy and no secure "
            "aggregation. Nothing bounds what the trained model reveals about any user or interaction.",
        }
    text = opening + "Protections on in this run: " + "; ".join(parts) + "."
    if not (guaranteed["user_level"] or guaranteed["record_level"]):
        text += " No differential privacy: nothing bounds what the trained model reveals about a user."
    return {"protected": True, "server_could_read": read, "text": text}


def _fmt_number(value: float | None) -> str:
    return "nothing (the record does not describe a mechanism dp-accounting covers)" if value is None else f"{value:.3g}"


def beyond_accuracy(final: dict[str, Any] | None, run_config: dict[str, Any]) -> dict[str, Any] | None:
    """Diversity, coverage, novelty and quality per group of the final evaluation (None if not measured).

    Only aggregates are here: the devices' per-group sums were merged by the server, and
    groups under ``group-min-users`` were suppressed before anything was written.
    """
    final = final or {}
    groups = []
    for key, value in final.items():
        if key.startswith("group/") and key.endswith("/count"):
            name = key[len("group/"):-len("/count")]
            dimension, _, label = name.partition("=")
            prefix = f"group/{name}/"
            groups.append({"dimension": dimension, "label": label, "users": int(value),
                           "hr@10": final.get(prefix + "sampled_hr@10"), "ndcg@10": final.get(prefix + "sampled_ndcg@10"),
                           "full_hr@10": final.get(prefix + "full_hr@10"),
                           "full_ndcg@10": final.get(prefix + "full_ndcg@10")})
    measured = {"intra_list_diversity@10": final.get("test_ild@10"), "coverage@10": final.get("coverage@10"),
                "novelty@10": final.get("novelty@10"), "shown_hr@10": final.get("test_shown_hr@10")}
    if not groups and all(v is None for v in measured.values()):
        return None
    return {
        **measured,
        "rerank_diversity": run_config.get("rerank-diversity", 0.0),
        "groups": sorted(groups, key=lambda g: (g["dimension"], g["label"])),
        "groups_suppressed": int(final.get("groups_suppressed", 0)),
        "group_min_users": run_config.get("group-min-users"),
        # Under SecAgg+ the lists' item counts came summed, never as one device's list.
        "devices_sent_lists": final.get("coverage@10") is not None and not switched_on(run_config, "secure-aggregation"),
        "group_sums_in_clear": not any(switched_on(run_config, k) for k in ("secure-aggregation", "user-dp", "record-dp")),
    }


def privacy_utility(run_config: dict[str, Any], rounds: list[dict[str, Any]],
                    reference: dict[str, Any] | None) -> dict[str, Any]:
    """The run's own (epsilon, HR@10) trajectory, next to a frontier from the benchmark if one is given."""
    mode = mode_of(run_config)
    return {"mode": mode, "points": [list(p) for p in trajectory(rounds, mode)], "reference": reference}


def read_reference(path: str | Path) -> dict[str, Any]:
    """A frontier written by ``python -m simulations.frontier`` (its PREFIX.json)."""
    data = _read_json(Path(path), required=True)
    if not isinstance(data, dict) or not isinstance(data.get("points"), list) or not isinstance(data.get("levels"), dict):
        raise DataError("expected the JSON of python -m simulations.frontier (points and levels)", Path(path))
    return {"source": str(path), "points": data["points"], "levels": data["levels"]}


def build_report(run_dir: str | Path, frontier: str | Path | None = None) -> dict[str, Any]:
    """Every fact of the report, read from ``run_dir`` (and the reference frontier file, if given)."""
    path = Path(run_dir)
    if not path.exists():
        raise DataError("no such run directory", path)
    if not path.is_dir():
        raise DataError("not a directory (expected a run directory)", path)
    config = _read_json(path / "config.json", required=True)
    privacy = _read_json(path / "privacy.json", required=True)
    dataset = _read_json(path / "dataset.json", required=False)
    summary = _read_json(path / "summary.json", required=False)
    audit = _read_json(path / "audit.json", required=False)
    metrics = _read_jsonl(path / "metrics.jsonl")
    traffic = _read_jsonl(path / "traffic.jsonl")
    run_config = config.get("run_config")
    if not isinstance(run_config, dict):
        raise DataError("expected an object under 'run_config'", path / "config.json")

    protected = protections(run_config, privacy)
    rounds = _rounds(metrics)
    guaranteed = guarantees(protected, rounds, traffic, rounds_run(rounds, summary))
    recomputed_hash = config_hash(run_config)
    final = (summary or {}).get("final_evaluation") or next(
        (r for r in reversed(metrics) if r.get("phase") == "evaluate"), None
    )
    return {
        "schema_version": SCHEMA_VERSION,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run_dir": str(path.resolve()),
        "headline": headline(protected, guaranteed),
        "run": {
            "finished": summary is not None,
            "rounds_requested": int(run_config.get("num-server-rounds", 0)),
            "rounds_completed": max((r["round"] for r in rounds if "clients_ok" in r), default=0),
            "wall_seconds": (summary or {}).get("wall_seconds"),
            "stop_reason": (summary or {}).get("stop_reason"),
            "engine": protected["engine"],
        },
        "dataset": dataset,
        "protections": protected,
        "threat_model": threat_model(protected),
        "guarantees": guaranteed,
        "rounds": rounds,
        "utility": {k: v for k, v in (final or {}).items()
                    if isinstance(v, (int, float, str)) and k != "phase" and not k.startswith("group/")},
        "beyond_accuracy": beyond_accuracy(final, run_config),
        "privacy_utility": privacy_utility(run_config, rounds, read_reference(frontier) if frontier else None),
        "audits": audit,
        "disclosure": disclosure(path, run_config),
        "configuration": {
            "sha256": config.get("config_sha256"),
            "sha256_recomputed": recomputed_hash,
            "matches": config.get("config_sha256") == recomputed_hash,
            "run_config": run_config,
        },
    }


def validate_report(report: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``report`` matches the schema in the repo."""
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate(report)


def find_chromium() -> str | None:
    """A headless-capable Chromium/Chrome on PATH (or $FEDREC_CHROMIUM), for the optional PDF."""
    import os
    import shutil

    for name in (os.environ.get("FEDREC_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def print_pdf(html: Path, pdf: Path) -> Path:
    """The HTML report printed to PDF by headless Chromium (optional: only if one is installed)."""
    import subprocess

    browser = find_chromium()
    if browser is None:
        raise FileNotFoundError("a PDF needs Chromium or Chrome on PATH (Debian: apt-get install chromium) "
                                "or FEDREC_CHROMIUM=/path/to/chrome")
    tmp = pdf.with_name(f".{pdf.name}.tmp")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-pdf-header-footer",
                    f"--print-to-pdf={tmp}", html.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    tmp.replace(pdf)
    return pdf


def write_report(
    run_dir: str | Path, out_dir: str | Path | None = None, *, pdf: bool = False, frontier: str | Path | None = None
) -> dict[str, Path]:
    """``report.json`` and a self-contained ``report.html`` (into ``run_dir`` by default), and optionally a PDF.

    ``frontier``: a privacy-utility frontier (``python -m simulations.frontier``) to draw the run's point against.
    """
    from server.report_html import render_html

    report = build_report(run_dir, frontier)
    validate_report(report)
    target = Path(out_dir) if out_dir else Path(run_dir)
    target.mkdir(parents=True, exist_ok=True)
    paths = {"json": target / "report.json", "html": target / "report.html"}
    atomic_write_bytes(paths["json"], json.dumps(report, indent=2, allow_nan=False).encode())
    atomic_write_bytes(paths["html"], render_html(report).encode())
    if pdf:
        paths["pdf"] = print_pdf(paths["html"], target / "report.pdf")
    return paths
