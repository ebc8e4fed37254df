"""The report for people: one self-contained HTML page (inline CSS and SVG, no scripts).

It renders the document ``server.report.build_report`` made and adds no number of its
own, so the HTML and ``report.json`` can never disagree.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any, Iterable

from server.report_plots import epsilon_plot, frontier_plot, utility_plot

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;
color:#1b1b1b;line-height:1.45}
h1{font-size:1.6rem}h2{font-size:1.2rem;border-bottom:1px solid #ccc;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f3f3f3}.num{text-align:right;font-variant-numeric:tabular-nums}
.banner{padding:.8rem 1rem;border-radius:.3rem;font-weight:600}
.unprotected{background:#fde8e8;border:2px solid #c62828}.protected{background:#e8f5e9;border:2px solid #2e7d32}
.warn{background:#fff8e1;border:1px solid #f9a825;padding:.5rem;border-radius:.3rem}
code,pre{font-family:ui-monospace,monospace;font-size:.85rem}pre{background:#f6f6f6;padding:.6rem;overflow-x:auto}
.on{color:#2e7d32;font-weight:600}.off{color:#c62828;font-weight:600}
"""


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows: Iterable[Iterable[Any]], header: Iterable[str] | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = []
    for row in rows:
        cells = []
        for cell in row:
            cls = ' class="num"' if isinstance(cell, (int, float)) and not isinstance(cell, bool) else ""
            cells.append(f"<td{cls}>{escape(_fmt(cell))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _pairs(mapping: dict[str, Any] | None) -> str:
    if not mapping:
        return "<p>-</p>"
    return _table(((key.replace("_", " "), value) for key, value in mapping.items()))


def _section(title: str, anchor: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>{body}</section>'


def _protections(p: dict[str, Any]) -> str:
    def state(on: bool) -> str:
        return '<span class="on">on</span>' if on else '<span class="off">off</span>'

    secagg = p["secure_aggregation"]
    rows = [
        f"<tr><td>record-level DP (Opacus DP-SGD on each device)</td><td>{state(p['record_level_dp']['on'])}</td></tr>",
        f"<tr><td>user-level DP (DP-FedAvg across the federation)</td><td>{state(p['user_level_dp']['on'])}</td></tr>",
        f"<tr><td>secure aggregation (SecAgg+)</td><td>{state(secagg['on'])}</td></tr>",
        f"<tr><td>TLS</td><td>{escape(p['tls']['status'])}: {escape(p['tls']['detail'])}</td></tr>",
        f"<tr><td>SuperNode authentication</td><td>{escape(p['supernode_authentication']['status'])}: "
        f"{escape(p['supernode_authentication']['detail'])}</td></tr>",
    ]
    out = f"<table><tr><th>protection</th><th>state</th></tr>{''.join(rows)}</table>"
    if secagg["on"]:
        out += "<h3>SecAgg+ parameters</h3>" + _pairs(secagg["parameters"])
        if secagg.get("limitations"):
            out += f'<p class="warn">Known limitation: {escape(secagg["limitations"])}</p>'
    return out


def _guarantees(g: dict[str, Any]) -> str:
    if not g["user_level"] and not g["record_level"]:
        return "<p><strong>No differential privacy guarantee:</strong> epsilon is unbounded for this run.</p>"
    out = ""
    if g["user_level"]:
        u = g["user_level"]
        out += "<h3>User-level (one user's whole data; server-side DP-FedAvg)</h3>"
        out += (f"<p>Epsilon {escape(_fmt(u['epsilon']))} at delta {escape(_fmt(u['delta']))} as the run's accountant "
                f"recorded it; {escape(_fmt(u['recomputed_epsilon']))} as this report recomputes it over "
                f"{escape(_fmt(u['rounds']))} rounds with dp-accounting events of its own.</p>")
        out += _pairs(u)
        if not u["recomputation_matches"]:
            out += '<p class="warn">The recorded epsilon does not match the report\'s own recomputation from the ' \
                   "recorded parameters and rounds: the record was changed or the run's accounting is wrong; treat " \
                   "this run's privacy figures as unverified.</p>"
        if not u.get("delta_below_one_over_n", True):
            out += '<p class="warn">Delta is not below 1/N: at such a delta, publishing one user\'s data outright ' \
                   "would satisfy the guarantee.</p>"
    if g["record_level"]:
        out += ("<h3>Record-level (one training example; Opacus DP-SGD on each device)</h3>"
                "<p>One example is an interaction or one of its sampled negatives (mse: one interaction). No "
                "epsilon is claimed for a whole interaction: group privacy over its 1 + num-negatives examples "
                "gives a vacuous delta, and negatives are redrawn every epoch, so one interaction changes other "
                "examples too.</p>")
        out += "<p>The user embedding, which stays on the device, is trained under the same DP-SGD step.</p>"
        out += _pairs(g["record_level"])
    return out


def _rounds_table(rounds: list[dict[str, Any]]) -> str:
    columns = ["round", "clients_ok", "user_epsilon", "user_delta", "record_epsilon_max", "record_epsilon_mean",
               "record_delta", "record_dp_declined", "hr@10", "ndcg@10", "full_hr@10", "eval_population"]
    present = [c for c in columns if any(c in r for r in rounds)]
    return _table(([r.get(c) for c in present] for r in rounds), [c.replace("_", " ") for c in present])


def _audits(audit: dict[str, Any] | None) -> str:
    if not audit:
        return "<p>No empirical audit was run for this run directory (<code>fedrec audit</code> writes one).</p>"
    found = audit.get("audits") or {}
    out = (f"<p>Scenario <code>{escape(str(audit.get('scenario')))}</code> on {escape(str(audit.get('dataset')))}: "
           f"{escape(_fmt(audit.get('clients')))} clients, {escape(_fmt(audit.get('rounds')))} rounds, model "
           f"{escape(str(audit.get('model')))}, {escape(_fmt(audit.get('seconds')))} s. Attacks run in simulation "
           "with the real client code, where the ground truth is known.</p>")
    if "interaction-inference" in found:
        rows = []
        for name, r in found["interaction-inference"]["settings"].items():
            attack, rand = r["projection"], r["random_guess"]
            rows.append((name, r["view"], attack["auc"], attack["precision"], attack["recall"], attack["f1"],
                         rand["precision"], rand["f1"], r.get("user_epsilon"), r.get("user_delta")))
        out += ("<h3>Interaction inference by a curious server (from what it receives)</h3>"
                + _table(rows, ("setting", "what the server sees", "AUC", "precision", "recall", "F1",
                                "random: precision", "random: F1", "user-level epsilon", "delta")))
    if "membership" in found:
        rows = []
        for name, r in found["membership"]["settings"].items():
            eps = r.get("user_epsilon", r.get("record_epsilon_max"))
            delta = r.get("user_delta", r.get("record_delta"))
            rows.append((name, r["members"], r["non_members"], r["score"]["auc"], r["score"]["tpr@1%fpr"],
                         r["random_guess"]["tpr@1%fpr"], eps, delta))
        out += ("<h3>Membership inference on the final model (score threshold)</h3>"
                + _table(rows, ("setting", "members", "non-members", "AUC", "TPR at 1% FPR", "random: TPR",
                                "epsilon", "delta")))
    if "canary" in found:
        rows = []
        for unit, r in found["canary"].items():
            rows.append((unit, r.get("unit"), r["canaries"], r["guesses"], r["correct"], r["epsilon_lower_bound"],
                         r.get("epsilon_ceiling"), r.get("claimed_epsilon"), r["delta"], 1 - r["beta"],
                         r.get("verdict")))
        out += ("<h3>Canary audit: empirical epsilon lower bound (one run, Steinke, Nasr and Jagielski 2023)</h3>"
                "<p>The ceiling is the largest bound the audit could print (every guess right). A bound at or "
                "below the accountant's epsilon proves something only when the ceiling is above it; otherwise the "
                "audit is inconclusive. No per-interaction epsilon is accounted under record-level DP (only one "
                "training example is), so a record-level canary audit there measures leakage without a claim.</p>"
                + _table(rows, ("audit", "privacy unit", "canaries", "guesses", "correct", "epsilon lower bound",
                                "ceiling", "accountant epsilon (this unit)", "delta", "confidence", "verdict")))
    return out + f"<details><summary>audit.json</summary><pre>{escape(json.dumps(audit, indent=2))}</pre></details>"


def _beyond_accuracy(ba: dict[str, Any] | None) -> str:
    if ba is None:
        return "<p>Not measured in this run.</p>"
    lists = {k: ba[k] for k in ("intra_list_diversity@10", "coverage@10", "novelty@10", "shown_hr@10", "rerank_diversity")
             if ba[k] is not None}
    rows = ((g["dimension"], g["label"], g["users"], g["hr@10"], g["ndcg@10"], g["full_hr@10"], g["full_ndcg@10"])
            for g in ba["groups"])
    if ba.get("group_sums_in_clear", True):
        where = ('<p class="warn">Each device sent its sums per group keyed by the group\'s name, in the clear: the '
                 "server learnt which groups each device's users are in. ")
    else:
        where = ("<p>No group label left a device: under secure aggregation the per-group sums of every possible "
                 "group travelled inside each device's masked evaluation vector, so the server saw only their sum "
                 "(in other private modes no device sent any). ")
    note = (where + f"The server published a group only if at least {_fmt(ba['group_min_users'])} users were in it; "
            f"{ba['groups_suppressed']} group(s) were suppressed.</p>")
    if ba["devices_sent_lists"]:
        note += ('<p class="warn">For coverage and novelty every evaluated device sent the items of its users\' '
                 "top-10 lists (catalogue-metrics): with one user per device the server saw that user's list, and "
                 "with the device's hit count, that one of those items is one the user interacted with.</p>")
    return (_pairs(lists) + note
            + _table(rows, ("group", "label", "users", "HR@10", "NDCG@10", "full HR@10", "full NDCG@10")))


def _privacy_utility(pu: dict[str, Any]) -> str:
    """The run's (epsilon, HR@10) after each evaluated round, over the benchmark's frontier when given."""
    own = [tuple(p) for p in pu["points"]]
    reference = pu.get("reference") or {}
    lines: dict[str, list[tuple[float, float]]] = {}
    for row in reference.get("points", []):
        if row.get("epsilon") is not None:
            lines.setdefault(row["line"], []).append((row["epsilon"], row["hr@10"]))
    svg = frontier_plot(lines, dict(reference.get("levels", {})), own=own or None, name="privacy-utility")
    if not own:
        note = (f"<p>No differential privacy in this run ({escape(pu['mode'])}): it spends no epsilon, "
                "so it has no point on the privacy-utility plane.</p>")
        return note + (svg or "")
    last_eps, last_hr = own[-1]
    text = (f"<p>{escape(pu['mode'])}: HR@10 {last_hr:.4f} at epsilon {last_eps:.3f} spent (the star; the line is "
            "the run's evaluated rounds). ")
    text += (f"Reference frontier: <code>{escape(str(reference['source']))}</code>.</p>" if reference else
             "No reference frontier was given (<code>fedrec report RUN_DIR --frontier FILE.json</code> draws the "
             "benchmark's lines, ItemPop and the non-private levels behind this point).</p>")
    return text + (svg or "")


def _disclosure(d: dict[str, Any]) -> str:
    """Every reply field the server received, with whether it could read it and what it tells."""
    if not d["recorded"]:
        return f"<p>{escape(d['note'])}.</p>"
    rows = ((f["message_type"], f["stage"] or "-", f"{f['record']} / {f['key']}", f["type"], f["replies"],
             f["visibility"], f["reveals"]) for f in d["fields"])
    return (f"<p>{escape(d['note'])}. <em>clear</em>: the server reads the value; <em>masked</em>: only the SecAgg+ "
            "sum over the round's devices can be recovered; <em>protocol</em>: SecAgg+ key material.</p>"
            + _table(rows, ("message", "SecAgg+ stage", "record / field", "type", "replies", "server sees",
                            "what it reveals")))


def render_html(report: dict[str, Any]) -> str:
    """The whole page; plots are inline SVG made from the report's own per-round rows."""
    head = report["headline"]
    run = report["run"]
    rounds = report["rounds"]
    g = report["guarantees"]
    user_budget = (g["user_level"] or {}).get("epsilon_budget")
    record_budget = (g["record_level"] or {}).get("epsilon_budget_per_device")
    eps_svg = epsilon_plot(rounds, user_budget, record_budget)
    util_svg = utility_plot(rounds, (report["dataset"] or {}).get("sampled_negatives"))
    config = report["configuration"]
    hash_note = "" if config["matches"] else (
        '<p class="warn">The configuration below does not hash to the value recorded when the run started: '
        "config.json was changed after the run.</p>"
    )
    finished = "" if run["finished"] else (
        '<p class="warn">The run has not finished (no summary.json): this report covers the rounds completed so far.</p>'
    )
    threat_rows = ((t["adversary"], t["can"], t["sees"], t["protection"]) for t in report["threat_model"])
    sections = [
        _section("What was trained, on what", "data",
                 _pairs(report["dataset"]) if report["dataset"] else "<p>No dataset.json in this run directory.</p>"),
        _section("Run", "run", _pairs(run)),
        _section("Protections", "protections", _protections(report["protections"])),
        _section("Threat model", "threat-model",
                 _table(threat_rows, ("adversary", "can", "what it sees", "protection in this run"))),
        _section("Guarantees (computed by the accountants)", "guarantees", _guarantees(g)),
        _section("Privacy spent per round", "epsilon-per-round",
                 (_deltas(g) + eps_svg) if eps_svg else "<p>No differential privacy: no epsilon was spent or bounded.</p>"),
        _section("Utility per round", "utility-per-round",
                 (util_svg or "<p>No evaluation rounds recorded.</p>") + "<h3>Final evaluation</h3>"
                 + _pairs(report["utility"])),
        _section("Privacy and utility", "privacy-utility", _privacy_utility(report["privacy_utility"])),
        _section("Beyond accuracy: diversity, coverage, novelty, groups", "beyond-accuracy",
                 _beyond_accuracy(report["beyond_accuracy"])),
        _section("What the server received", "disclosure", _disclosure(report["disclosure"])),
        _section("Per-round record", "rounds", _rounds_table(rounds)),
        _section("Per-client budget status", "client-budgets", _client_budgets(g)),
        _section("Empirical audits", "audits", _audits(report["audits"])),
        _section("Configuration that was run", "configuration",
                 hash_note + f"<p>SHA-256 <code>{escape(str(config['sha256']))}</code> "
                 f"(recomputed <code>{escape(config['sha256_recomputed'])}</code>)</p>"
                 f"<pre>{escape(json.dumps(config['run_config'], indent=2, sort_keys=True))}</pre>"),
    ]
    banner_class = "protected" if head["protected"] else "unprotected"
    read = head.get("server_could_read")
    text = head["text"]
    opening = ""
    if read:  # without SecAgg+ the page opens with what the server read, then the rest of the headline
        opening = f'<p class="banner unprotected" id="server-could-read">{escape(read)}</p>'
        text = text[len(read):].strip() if text.startswith(read) else text
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
        f"<title>fedrec privacy report</title><style>{STYLE}</style></head><body>"
        f"<h1>fedrec privacy audit report</h1>"
        f'{opening}<p class="banner {banner_class}" id="headline">{escape(text)}</p>'
        f"{finished}<p>Run directory <code>{escape(report['run_dir'])}</code>; generated {escape(report['generated_at'])}; "
        "every figure below is read from that directory.</p>"
        + "".join(sections)
        + "</body></html>"
    )


def _deltas(g: dict[str, Any]) -> str:
    """The delta every epsilon in the plot below is stated at."""
    parts = []
    if g["user_level"]:
        parts.append(f"user-level epsilon at delta {_fmt(g['user_level']['delta'])}")
    if g["record_level"]:
        parts.append(f"record-level epsilon at delta {_fmt(g['record_level']['delta'])}")
    return f"<p>{escape('; '.join(parts))}.</p>" if parts else ""


def _client_budgets(g: dict[str, Any]) -> str:
    record = g["record_level"]
    parts = []
    if record:
        parts.append(_table([
            ("devices that reported an epsilon", record["clients_reporting"]),
            ("devices that hit their budget and declined to train", record["clients_hit_budget"]),
            ("declines over all rounds", record["declines"]),
            ("per-device budget", record["epsilon_budget_per_device"]),
            ("largest epsilon of any device", record["epsilon_max"]),
            ("median epsilon over devices", record["epsilon_median"]),
            ("delta of every record-level epsilon", record["delta"]),
        ]))
    user = g["user_level"]
    if user:
        stop = user.get("stop_reason") or "the run was not stopped by its budget"
        parts.append(f"<p>User-level budget {escape(_fmt(user.get('epsilon_budget')))} at delta "
                     f"{escape(_fmt(user['delta']))}: {escape(stop)}.</p>")
    return "".join(parts) or "<p>No privacy budget applies: no differential privacy in this run.</p>"
