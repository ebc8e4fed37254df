"""The privacy audit report: read from real run directories, schema-valid, rendered by Chromium."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import dp_accounting
import jsonschema
import pytest
from dp_accounting import rdp

from common.config import parse_run_config
from common.errors import DataError
from common.federation import slicer_cached
from common.privacy import UserLevelDP
from server.report import SCHEMA_PATH, build_report, find_chromium, validate_report, write_report
from simulations.cli import main as fedrec
from simulations.engine import fused_run_config, run_in_process

SMALL = {
    "synthetic-users": 12,
    "synthetic-items": 80,
    "eval-negatives": 20,
    "synthetic-mean-interactions": 10,
    "num-server-rounds": 4,
    "evaluate-every": 1,
    "fraction-evaluate": 1.0,
    "embedding-dim": 8,
}
Q, Z, C = 0.5, 1.0, 0.1
USER_DP = UserLevelDP(Z, C, num_clients=12, sampling="poisson", sampling_rate=Q)
USER_BUDGET = (USER_DP.epsilon(3) + USER_DP.epsilon(4)) / 2  # round 4 would overspend: the run stops after 3
PROTECTED = {
    "user-dp": True, "client-sampling": "poisson", "fraction-train": Q, "user-dp-noise-multiplier": Z,
    "user-dp-clipping-norm": C, "user-dp-epsilon-budget": USER_BUDGET,
    "secure-aggregation": True,
    "record-dp": True, "record-dp-noise-multiplier": 1.0, "record-dp-epsilon-budget": 6.5,
}


def _run(directory: Path, overrides: dict) -> Path:
    overrides = {**SMALL, "run-dir": str(directory), **overrides}
    run_in_process(overrides, len(slicer_cached(parse_run_config(fused_run_config(overrides)))))
    return directory


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("report") / "plain", {})


@pytest.fixture(scope="module")
def protected_run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("report") / "protected", PROTECTED)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_every_run_ends_with_a_schema_valid_report_that_says_when_nothing_protected_it(plain_run):
    report = json.loads((plain_run / "report.json").read_text())  # written by the ServerApp itself
    validate_report(report)
    assert report["headline"]["protected"] is False
    assert "NO privacy protection" in report["headline"]["text"]
    assert report["guarantees"] == {"user_level": None, "record_level": None}
    html = (plain_run / "report.html").read_text()
    # the warning is the first thing on the page, before any section
    assert html.index("NO privacy protection") < html.index("<section")
    assert "unprotected" in html


def test_report_numbers_are_the_run_directorys(plain_run):
    report = build_report(plain_run)
    metrics = _lines(plain_run / "metrics.jsonl")
    evaluated = {r["round"]: r for r in metrics if r["phase"] == "evaluate"}
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3, 4]
    for row in report["rounds"]:
        assert row["hr@10"] == evaluated[row["round"]]["test_sampled_hr@10"]
        assert row["ndcg@10"] == evaluated[row["round"]]["test_sampled_ndcg@10"]
    dataset = json.loads((plain_run / "dataset.json").read_text())
    assert report["dataset"] == dataset and dataset["users"] == 12 and dataset["clients"] == 12
    config = json.loads((plain_run / "config.json").read_text())
    assert report["configuration"]["sha256"] == config["config_sha256"] and report["configuration"]["matches"]
    summary = json.loads((plain_run / "summary.json").read_text())
    assert report["utility"]["test_sampled_hr@10"] == summary["final_evaluation"]["test_sampled_hr@10"]
    assert report["protections"]["tls"]["status"] == "not applicable"  # in-process simulation: no network


def test_protected_run_reports_each_guarantee_as_its_accountant_computed_it(protected_run):
    report = json.loads((protected_run / "report.json").read_text())
    validate_report(report)
    assert report["headline"]["protected"] is True
    for words in ("user-level DP", "record-level DP", "SecAgg+"):
        assert words in report["headline"]["text"]
    user = report["guarantees"]["user_level"]
    assert user["rounds"] == 3 and report["run"]["rounds_completed"] == 3
    assert "stopped after 3 of 4 rounds" in report["run"]["stop_reason"]
    # an independent dp-accounting composition of the same mechanism, by hand
    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(Z)), 3)
    assert user["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9) and user["delta"] == 1e-5
    assert user["recomputation_matches"] and user["epsilon"] <= USER_BUDGET
    assert (user["noise_multiplier"], user["clipping_norm"], user["sampling_rate"]) == (Z, C, Q)
    secagg = report["protections"]["secure_aggregation"]
    assert secagg["on"] and secagg["parameters"]["reconstruction_threshold"] == 2
    assert "RandomState" in secagg["limitations"]


def test_per_client_budget_status_counts_the_devices_that_declined(protected_run):
    report = build_report(protected_run)
    record = report["guarantees"]["record_level"]
    traffic = _lines(protected_run / "traffic.jsonl")
    declined = {r["node_id"] for r in traffic if r.get("record_dp_declined")}
    reported = {r["node_id"]: r["record_epsilon"] for r in traffic if "record_epsilon" in r}
    assert declined, "most devices need epsilon ~7 for one round: a budget of 6.5 must make some decline"
    assert record["clients_hit_budget"] == len(declined)
    assert record["clients_reporting"] == len(reported)
    assert record["epsilon_max"] == max(max(r["record_epsilon"] for r in traffic if r["node_id"] == n) for n in reported)
    assert record["epsilon_max"] <= record["epsilon_budget_per_device"]
    for row in report["rounds"]:  # each round: the largest cumulative epsilon of the devices in it
        in_round = [r["record_epsilon"] for r in traffic if r["round"] == row["round"]]
        assert row["record_epsilon_max"] == (max(in_round) if in_round else 0.0)


def test_html_has_every_section_and_nothing_to_fetch(protected_run):
    html = (protected_run / "report.html").read_text()
    for anchor in ("data", "protections", "threat-model", "guarantees", "epsilon-per-round", "utility-per-round",
                   "privacy-utility", "client-budgets", "audits", "disclosure", "configuration"):
        assert f'id="{anchor}"' in html
    assert html.count("<svg") == 3  # epsilon per round, utility per round, privacy-utility: inline
    for adversary in ("honest-but-curious server", "malicious clients", "network attacker"):
        assert adversary in html
    assert not re.search(r"<script|<link|<img|\bsrc=|url\((?!#)", html)  # only in-page references
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids))  # the two inline SVGs must not share clip-path ids


def test_a_changed_configuration_is_flagged(protected_run, tmp_path):
    copy_dir = tmp_path / "tampered"
    shutil.copytree(protected_run, copy_dir)
    config = json.loads((copy_dir / "config.json").read_text())
    config["run_config"]["user-dp-noise-multiplier"] = 10.0
    (copy_dir / "config.json").write_text(json.dumps(config))
    paths = write_report(copy_dir)
    assert json.loads(paths["json"].read_text())["configuration"]["matches"] is False
    assert "changed after the run" in paths["html"].read_text()


def test_an_unfinished_run_is_reported_as_such(plain_run, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(plain_run, partial)
    (partial / "summary.json").unlink()
    report = build_report(partial)
    assert report["run"]["finished"] is False and report["run"]["rounds_completed"] == 4
    validate_report(report)


def test_schema_rejects_reports_that_miss_or_mistype_facts(plain_run):
    report = build_report(plain_run)
    for breaks in (lambda r: r.pop("headline"), lambda r: r["run"].update(rounds_completed="4"),
                   lambda r: r["configuration"].update(sha256="not-a-hash"), lambda r: r.update(extra=1)):
        broken = copy.deepcopy(report)
        breaks(broken)
        with pytest.raises(jsonschema.ValidationError):
            validate_report(broken)
    jsonschema.Draft202012Validator.check_schema(json.loads(SCHEMA_PATH.read_text()))


def test_bad_run_directories_fail_with_the_file_and_line(plain_run, tmp_path, capsys):
    with pytest.raises(DataError, match="no such run directory"):
        build_report(tmp_path / "missing")
    broken = tmp_path / "broken"
    shutil.copytree(plain_run, broken)
    with open(broken / "metrics.jsonl", "a") as handle:
        handle.write("{truncated\n")
    line = len((broken / "metrics.jsonl").read_text().splitlines())
    with pytest.raises(DataError, match=rf"metrics.jsonl:{line}:"):
        build_report(broken)
    assert fedrec(["report", str(broken)]) == 2
    assert f"metrics.jsonl:{line}:" in capsys.readouterr().err


def test_fedrec_report_writes_both_files_where_asked(plain_run, tmp_path, capsys):
    assert fedrec(["report", str(plain_run), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.html").exists() and (tmp_path / "out" / "report.json").exists()
    assert "report.html" in capsys.readouterr().out


# --- headless Chromium --------------------------------------------------------------------
def _chromium() -> str:
    found = find_chromium()
    if found:
        return found
    pytest.fail("headless Chromium is needed for the report rendering test: `make test` installs Debian's "
                "chromium package; elsewhere set FEDREC_CHROMIUM to a Chrome/Chromium binary")


def _render(page: Path, screenshot: Path) -> list[str]:
    """Screenshot ``page``; returns the console messages Chromium logged while loading it."""
    result = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
         "--v=0", "--window-size=1200,2400", f"--screenshot={screenshot}", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return [line for line in result.stderr.splitlines() if ":CONSOLE" in line]


def test_console_check_catches_a_broken_page(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<html><body><script>console.error("boom"); notDefined();</script></body></html>')
    messages = _render(page, tmp_path / "broken.png")
    assert any("boom" in m for m in messages) and any("notDefined" in m for m in messages)


def test_report_renders_in_headless_chromium_without_console_errors(protected_run, tmp_path):
    screenshot = tmp_path / "report.png"
    messages = _render(protected_run / "report.html", screenshot)
    assert messages == []
    png = screenshot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1200, 2400)
    assert len(png) > 50_000  # a rendered page with tables and plots, not a blank one


def test_fedrec_audit_feeds_the_report_of_the_run_it_audits(protected_run, tmp_path, capsys):
    audited = tmp_path / "audited"
    shutil.copytree(protected_run, audited)
    assert fedrec(["audit", "--scenario", "interaction-inference", "--run-dir", str(audited),
                   "-c", "audit-max-targets=4 num-server-rounds=2"]) == 0
    audit = json.loads((audited / "audit.json").read_text())
    report = json.loads((audited / "report.json").read_text())
    assert report["audits"] == audit  # the report carries the audit as written, and was rebuilt
    # the audit ran the audited run's own setting (its run-config), with the flags on top
    assert audit["overrides"]["user-dp-epsilon-budget"] == USER_BUDGET and audit["rounds"] == 2
    html = (audited / "report.html").read_text()
    settings = audit["audits"]["interaction-inference"]["settings"]
    assert "Interaction inference by a curious server" in html
    assert f"{settings['secagg-off/no-dp']['projection']['auc']:.4g}" in html
    assert fedrec(["audit", "--scenario", "canary", "--run-dir", str(audited), "-c", "audit-canaries=50"]) == 2
    assert "audit-canaries=50" in capsys.readouterr().err  # a one-line error before any training
    # a canary audit too small to reach its claim is reported as inconclusive, never as passed
    assert fedrec(["audit", "--scenario", "canary", "--run-dir", str(audited),
                   "-c", 'audit-canaries=12 audit-canary-dp="on" num-server-rounds=2 user-dp-delta=1e-5']) == 0
    canary = json.loads((audited / "audit.json").read_text())["audits"]["canary"]
    user, record = canary["user-level"], canary["record-level"]
    assert user["epsilon_ceiling"] <= user["accountant_epsilon"]
    assert user["verdict"] == "inconclusive: ceiling below claim" and user["canaries_needed"] > 12
    assert record["claimed_epsilon"] is None and record["verdict"].startswith("no claim")
    html = (audited / "report.html").read_text()
    assert "inconclusive: ceiling below claim" in html and f"{user['epsilon_ceiling']:.4g}" in html
    assert "Record-level (one training example" in html and "one interaction" not in html.split("Record-level")[1][:60]


def test_cli_offers_exactly_the_audit_scenarios_that_exist():
    from simulations.audits import SCENARIOS
    from simulations.cli import AUDIT_SCENARIOS

    assert AUDIT_SCENARIOS == SCENARIOS


def test_optional_pdf_is_printed_by_chromium(plain_run, tmp_path):
    _chromium()  # fails with the install hint when there is none
    assert fedrec(["report", str(plain_run), "--out", str(tmp_path), "--pdf"]) == 0
    pdf = (tmp_path / "report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF-") and len(pdf) > 20_000


# --- what the server could read; delta beside every epsilon; the report's own recomputation ----
def test_a_run_without_secagg_opens_with_what_the_server_could_read(plain_run, protected_run):
    report = json.loads((plain_run / "report.json").read_text())
    read = report["headline"]["server_could_read"]
    assert report["headline"]["text"].startswith(read)
    assert read.startswith("Without secure aggregation the server read every device's own upload")
    assert "touched-items vector is 1 exactly for them, and only their rows are non-zero" in read
    html = (plain_run / "report.html").read_text()
    assert html.index('id="server-could-read"') < html.index('id="headline"') < html.index("<section")
    protected = json.loads((protected_run / "report.json").read_text())
    assert protected["headline"]["server_could_read"] is None  # SecAgg+: no single upload was read
    assert 'id="server-could-read"' not in (protected_run / "report.html").read_text()


def test_every_epsilon_of_a_run_comes_with_its_delta(protected_run):
    from server.strategy import progress_line

    fits = [r for r in _lines(protected_run / "metrics.jsonl") if r["phase"] == "fit"]
    assert fits and all(r["user_delta"] == 1e-5 and r["record_delta"] == 1e-5 for r in fits)
    recorded = {key: value for key, value in fits[-1].items() if value is not None}  # JSON wrote NaN as null
    line = progress_line(fits[-1]["round"], 4, recorded, 1.0, 1.0)
    assert f"user eps {fits[-1]['user_epsilon']:.3g} (delta 1e-05)" in line and "record eps max" in line
    privacy = json.loads((protected_run / "privacy.json").read_text())
    assert privacy["user_level"]["delta"] == 1e-5 and privacy["record_level"]["delta"] == 1e-5
    report = json.loads((protected_run / "report.json").read_text())
    assert all(r["user_delta"] == 1e-5 and r["record_delta"] == 1e-5 for r in report["rounds"] if "clients_ok" in r)
    assert "epsilon" in report["headline"]["text"] and report["headline"]["text"].count("at delta 1e-05") == 2
    html = (protected_run / "report.html").read_text()
    assert "user-level epsilon at delta 1e-05; record-level epsilon at delta 1e-05" in html


def test_the_report_recomputes_user_epsilon_without_the_runs_accounting_code(protected_run, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the report must not use the run's own accountant")

    monkeypatch.setattr(UserLevelDP, "epsilon", refuse)
    report = build_report(protected_run)
    user = report["guarantees"]["user_level"]
    recorded = [r for r in _lines(protected_run / "metrics.jsonl") if r["phase"] == "fit"][-1]["user_epsilon"]
    assert user["epsilon"] == recorded and user["rounds"] == 3
    assert user["recomputed_epsilon"] == pytest.approx(recorded, rel=1e-9) and user["recomputation_matches"]
    assert user["delta_below_one_over_n"] and "UNVERIFIED" not in report["headline"]["text"]


@pytest.mark.parametrize("tamper", ["rounds", "noise", "epsilon"])
def test_a_tampered_privacy_record_is_flagged(protected_run, tmp_path, tamper):
    copy_dir = tmp_path / "tampered"
    shutil.copytree(protected_run, copy_dir)
    if tamper == "rounds":  # the record claims more rounds ran than its epsilon covers
        summary = json.loads((copy_dir / "summary.json").read_text())
        (copy_dir / "summary.json").write_text(json.dumps({**summary, "rounds": summary["rounds"] + 2}))
    elif tamper == "noise":
        privacy = json.loads((copy_dir / "privacy.json").read_text())
        privacy["user_level"]["noise_multiplier"] *= 2
        (copy_dir / "privacy.json").write_text(json.dumps(privacy))
    else:  # the last round's epsilon replaced by the first round's
        rows = _lines(copy_dir / "metrics.jsonl")
        fits = [r for r in rows if r["phase"] == "fit"]
        fits[-1]["user_epsilon"] = fits[0]["user_epsilon"]
        (copy_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths = write_report(copy_dir)
    report = json.loads(paths["json"].read_text())
    user = report["guarantees"]["user_level"]
    assert not user["recomputation_matches"] and user["recomputed_epsilon"] != pytest.approx(user["epsilon"])
    assert "UNVERIFIED" in report["headline"]["text"]
    assert "does not match the report's own recomputation" in paths["html"].read_text()


def test_the_privacy_utility_point_is_the_runs_own_epsilon_and_hr(protected_run):
    """Each point pairs the epsilon the run recorded by a round with the HR@10 measured after it."""
    report = json.loads((protected_run / "report.json").read_text())
    rows = _lines(protected_run / "metrics.jsonl")
    spent = {r["round"]: r["user_epsilon"] for r in rows if r.get("phase") == "fit" and r.get("user_epsilon") is not None}
    measured = {r["round"]: r["test_sampled_hr@10"] for r in rows if r.get("phase") == "evaluate"
                and r.get("test_sampled_hr@10") is not None}
    expected = [[spent[k], measured[k]] for k in sorted(spent) if k in measured]
    pu = report["privacy_utility"]
    assert pu["mode"] == "user-level DP" and len(expected) >= 2
    assert [x for p in pu["points"] for x in p] == pytest.approx([x for p in expected for x in p])
    assert pu["points"][-1][0] == pytest.approx(report["guarantees"]["user_level"]["epsilon"])
    html = (protected_run / "report.html").read_text()
    assert f"at epsilon {expected[-1][0]:.3f} spent" in html


def test_a_run_without_dp_has_no_privacy_utility_point(plain_run):
    report = json.loads((plain_run / "report.json").read_text())
    assert report["privacy_utility"] == {"mode": "no DP", "points": [], "reference": None}
    assert "spends no epsilon" in (plain_run / "report.html").read_text()


def test_the_frontier_benchmark_averages_seeds_and_the_report_draws_the_run_against_it(
        plain_run, protected_run, tmp_path, capsys):
    from simulations.frontier import main as frontier

    twin = tmp_path / "protected-twin"  # the same setting on another seed: one point, two seeds
    shutil.copytree(protected_run, twin)
    config = json.loads((twin / "config.json").read_text())
    seed = int(config["run_config"]["seed"])
    config["run_config"]["seed"] = seed + 1
    (twin / "config.json").write_text(json.dumps(config))
    summary = json.loads((twin / "summary.json").read_text())
    summary["final_evaluation"]["test_sampled_hr@10"] = 0.0
    (twin / "summary.json").write_text(json.dumps(summary))
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps([{"model": "itempop", "test": {"sampled_hr@10": 0.2}},
                                    {"model": "gmf", "test": {"sampled_hr@10": 0.5}},
                                    {"model": "ease", "test": {"sampled_hr@10": 0.6}}]))
    out = tmp_path / "plot" / "frontier"
    assert frontier([str(plain_run), str(protected_run), str(twin), "--baseline", f"synthetic={baseline}",
                     "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    hr = json.loads((protected_run / "summary.json").read_text())["final_evaluation"]["test_sampled_hr@10"]
    [private] = [p for p in data["points"] if p["mode"] == "user-level DP"]
    assert private["seeds"] == [seed, seed + 1] and len(private["run_dirs"]) == 2
    assert private["hr@10"] == pytest.approx(hr / 2)  # the mean of the two seeds
    recorded = [r["user_epsilon"] for r in _lines(protected_run / "metrics.jsonl") if r.get("user_epsilon") is not None]
    assert private["epsilon"] == pytest.approx(recorded[-1]) and private["delta"] == 1e-5
    assert data["levels"]["ItemPop (synthetic)"] == 0.2 and data["levels"]["centralized ease (synthetic)"] == 0.6
    assert any(label.startswith("no DP, federated") for label in data["levels"])
    assert out.with_suffix(".svg").read_text().startswith("<svg")
    assert "| user-level DP" in capsys.readouterr().out

    report_dir = tmp_path / "report"
    assert fedrec(["report", str(protected_run), "--out", str(report_dir), "--frontier",
                   str(out.with_suffix(".json"))]) == 0
    reference = json.loads((report_dir / "report.json").read_text())["privacy_utility"]["reference"]
    assert reference["levels"] == data["levels"]
    assert str(out.with_suffix(".json")) in (report_dir / "report.html").read_text()


def test_the_frontier_benchmark_refuses_a_run_that_did_not_finish(tmp_path, capsys):
    from simulations.frontier import main as frontier

    assert frontier([str(tmp_path), "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "summary.json" in err[0]
