"""Test markers, so a developer can run the quick part of the suite (``make test-fast``).

``make test`` (what CI runs) runs everything. The markers:

- ``slow``: takes more than a few seconds on a quiet 2-core machine (federated simulations,
  training to a quality bar, subprocesses that import torch);
- ``deployment``: real SuperLink and SuperNode processes on loopback;
- ``browser``: renders in headless Chromium;
- ``packaging``: builds the wheel and runs it from a fresh virtual environment.

Tests are marked here by name (``MARKED``) rather than in each file, so one list says what
``test-fast`` leaves out; a name that no longer exists is an error, not a silently fast test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from common.threads import use_threads

# Test processes pick their thread count like every fedrec process (common/threads.py); conftest is
# imported before any test module, so before numpy and torch size their pools.
use_threads()

MARKERS = {
    "slow": "takes more than a few seconds (deselected by make test-fast)",
    "deployment": "starts real SuperLink/SuperNode processes on loopback (deselected by make test-fast)",
    "browser": "renders in headless Chromium (deselected by make test-fast)",
    "packaging": "builds the wheel and runs it from a fresh virtual environment (also slow)",
}

SLOW = ("slow",)
# file -> {test name (without parameters) or "*" for every test of the file: markers}. Measured
# with `pytest --durations` file by file on a loaded 2-core machine: a test is slow when it
# runs a federation (Simulation Engine, real processes), trains to a quality bar, or starts
# a Python subprocess that imports torch or Flower.
MARKED: dict[str, dict[str, tuple[str, ...]]] = {
    "tests/test_audit.py": {
        "test_interaction_attack_beats_random_without_protection_and_falls_with_secagg": SLOW,
        "test_canary_audit_would_catch_a_run_without_noise": SLOW,
        "test_fedrec_audit_on_its_documented_configuration_could_fail_does_not_and_detects_leakage_without_dp": SLOW,
    },
    "tests/test_beyond_accuracy.py": {
        "test_a_kiosk_reports_sums_per_group_and_the_items_of_its_lists_never_its_users_labels": SLOW,
    },
    "tests/test_benchmarks.py": {"*": SLOW},
    "tests/test_cli.py": {"test_itempop_and_trained_baseline_on_synthetic_data": SLOW},
    "tests/test_client_footprint.py": {
        "test_client_app_trains_and_evaluates_with_server_and_simulation_packages_blocked": SLOW,
        "test_a_bad_thread_limit_is_a_clear_error": SLOW,
    },
    "tests/test_coldstart_quality.py": {"*": SLOW},
    "tests/test_credentials.py": {
        "test_cli_certs_refuses_existing_files_with_exit_2": SLOW,
        "test_supernode_keys_load_the_way_flwr_loads_them": SLOW,
    },
    "tests/test_deployment.py": {"*": ("deployment", "slow")},
    "tests/test_device_store.py": {"test_a_process_killed_mid_write_leaves_the_previous_state": SLOW},
    "tests/test_device_serving.py": {
        "test_simulate_then_export_then_recommend_serves_the_users_own_list": SLOW,
        "test_a_kiosk_exports_its_trained_rows_and_the_file_serves_what_its_state_dir_serves": SLOW,
        "test_recommending_from_a_state_dir_imports_neither_training_code_nor_opacus_nor_flower": SLOW,
    },
    "tests/test_docker_lint.py": {"test_every_command_is_accepted_by_flwr": SLOW},
    "tests/test_federated.py": {"*": SLOW},
    "tests/test_als.py": {
        "test_federated_als_is_the_centralized_exact_als": SLOW,
        "test_every_real_private_upload_is_within_the_clip_the_accountant_assumes": SLOW,
        "test_secure_aggregation_with_user_dp_sends_only_masked_vectors": SLOW,
    },
    "tests/test_ease.py": {
        "test_federated_ease_is_the_centralized_ease_and_each_upload_is_the_device_gram": SLOW,
        "test_federated_ease_under_secagg_is_the_centralized_ease_and_sends_only_masked_vectors": SLOW,
    },
    "tests/test_fleet.py": {
        "test_training_converges_with_30_percent_dropout": SLOW,
        "test_short_rounds_are_skipped_or_retried_never_crash": SLOW,
    },
    "tests/test_hybrid.py": {
        "test_a_hybrid_model_learns_to_rank_items_no_one_trained_on": SLOW,
        "test_the_content_loss_teaches_new_items_without_dropping_pairs_from_the_rows": SLOW,
    },
    "tests/test_poisoning.py": {"test_fake_users_promote_the_target_and_the_median_keeps_it_out": SLOW},
    "tests/test_popularity.py": {"test_on_kiosks_the_published_list_ranks_by_positives_and_is_not_id_ordered": SLOW},
    "tests/test_privacy.py": {
        "test_dp_off_is_the_non_private_path_bit_for_bit_and_dp_on_changes_it": SLOW,
        "test_server_stops_before_the_budget_is_exceeded_and_says_why": SLOW,
        "test_user_dp_under_secagg_noises_the_masked_sum": SLOW,
        "test_record_level_epsilon_accumulates_across_rounds_in_the_devices_state": SLOW,
        "test_devices_past_their_budget_decline_and_the_model_does_not_move": SLOW,
    },
    "tests/test_report.py": {  # the module's runs (plain_run, protected_run) are federations
        "*": SLOW,
        "test_console_check_catches_a_broken_page": ("browser",),
        "test_report_renders_in_headless_chromium_without_console_errors": ("browser",),
        "test_optional_pdf_is_printed_by_chromium": ("browser",),
    },
    "tests/test_resume.py": {"test_a_killed_run_resumes_after_its_last_completed_round_and_epsilon_goes_on": SLOW},
    "tests/test_secagg_dp.py": {"test_distributed_noise_end_to_end_in_simulation": SLOW},
    "tests/test_vectorized_als.py": {
        "test_plain_als_same_item_factors_and_metrics_each_round": SLOW,
        "test_private_als_same_item_factors_metrics_and_epsilon": SLOW,
    },
    "tests/test_sampling.py": {"test_two_simulations_of_one_run_config_train_the_same_devices_and_agree": SLOW},
}


def pytest_configure(config: pytest.Config) -> None:
    for name, help_text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {help_text}")


@pytest.hookimpl(tryfirst=True)  # before -m / -k deselect, so every test of a collected file is seen
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seen: dict[str, set[str]] = {}
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        name = item.nodeid.split("::")[-1].split("[", 1)[0]
        seen.setdefault(path, set()).add(name)
        marks = MARKED.get(path, {})
        for marker in (*marks.get("*", ()), *marks.get(name, ())):
            item.add_marker(getattr(pytest.mark, marker))
    # A name is stale when its file no longer defines it (not merely when a run selected fewer tests).
    stale = [f"{path}::{name}" for path, names in MARKED.items() if path in seen
             for name in names if name != "*" and name not in seen[path]
             and f"def {name}(" not in Path(config.rootpath, path).read_text(encoding="utf-8")]
    if stale:
        raise pytest.UsageError(f"tests/conftest.py MARKED names tests that do not exist: {', '.join(stale)}")
