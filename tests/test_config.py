"""Run-config: the keys defined once in code, pyproject.toml and the docs kept identical, bad values in one line."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from common.config import (
    RUN_CONFIG_KEYS,
    ConfigError,
    FedRecConfig,
    default_run_config,
    fused_run_config,
    parse_run_config,
)
from common.config_keys import to_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_code_defaults_parse():
    config = parse_run_config(fused_run_config())
    assert config.dataset == "synthetic"
    assert config.model_config.mlp_layers == (64, 32, 16)
    assert config.train_config.proximal_mu == 0.0  # only FedProx sends a proximal term


def test_fedprox_turns_on_the_proximal_term():
    config = parse_run_config(fused_run_config({"strategy": "fedprox", "proximal-mu": 0.5}))
    assert config.train_config.proximal_mu == 0.5


def test_unknown_key_is_rejected_before_anything_runs():
    with pytest.raises(ConfigError, match=r"unknown run-config key.*'learning-rat' \(did you mean 'learning-rate'\?\);"):
        fused_run_config({"learning-rat": 0.1})


@pytest.mark.parametrize(
    "override, message",
    [
        ({"model": "svd"}, "model must be one of"),
        ({"strategy": "krum"}, "strategy must be one of"),
        ({"batch-size": 0}, "batch-size must be > 0"),
        ({"learning-rate": -1.0}, "learning-rate must be > 0"),
        ({"fraction-train": 1.5}, r"fraction-train must be in \(0, 1\]"),
        ({"num-negatives": -1}, "num-negatives must be >= 0"),
        ({"local-epochs": "two"}, "'local-epochs' must be int"),
        ({"row-wise-aggregation": 1}, "'row-wise-aggregation' must be bool"),
        ({"mlp-layers": "64,x"}, "mlp-layers must be comma-separated"),
        ({"loss": "bpr", "num-negatives": 0}, "bpr"),
        ({"secagg-num-shares": 3, "secagg-reconstruction-threshold": 4}, "must not exceed secagg-num-shares"),
        ({"secure-aggregation": True, "secagg-num-shares": 2}, "secagg-num-shares >= 3"),
        ({"secagg-quantization-range": 0}, "secagg-quantization-range must be > 0"),
        ({"shared-adam-epsilon": 0.0}, "shared-adam-epsilon must be > 0"),
        ({"user-learning-rate": -0.1}, "user-learning-rate must be >= 0"),
        ({"dense-learning-rate": -0.1}, "dense-learning-rate must be >= 0"),
        ({"aggregation": "geomed"}, "aggregation must be one of"),
        ({"client-weight": "users"}, "client-weight must be one of"),
        ({"trim-fraction": 0.5}, r"trim-fraction must be in \[0, 0.5\)"),
        ({"norm-bound": -1.0}, "norm-bound must be >= 0"),
        ({"aggregation": "median", "secure-aggregation": True}, "SecAgg\\+ only reveals their sum"),
        ({"norm-bound": 1.0, "secure-aggregation": True}, "SecAgg\\+ only reveals their sum"),
        ({"aggregation": "krum", "user-dp": True}, "different sensitivity"),
        ({"exclude-after-rejections": -1}, "exclude-after-rejections must be >= 0"),
        ({"server-learning-rate-decay": 1.5}, r"server-learning-rate-decay must be in \(0, 1\]"),
        ({"server-learning-rate-decay-from": -1}, "server-learning-rate-decay-from must be >= 0"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        parse_run_config(fused_run_config(override))


def test_missing_key_names_the_key_and_where_defaults_live():
    config = fused_run_config()
    del config["seed"]
    with pytest.raises(ConfigError, match="missing 'seed'.*pyproject.toml"):
        parse_run_config(config)


def test_int_is_accepted_where_a_float_is_expected():
    assert parse_run_config(fused_run_config({"learning-rate": 1})).learning_rate == 1.0


def test_server_step_is_constant_until_the_decay_round_then_geometric():
    config = parse_run_config(fused_run_config(
        {"server-learning-rate": 2.0, "server-learning-rate-decay": 0.5, "server-learning-rate-decay-from": 3}
    ))
    assert [config.server_step(r) for r in (1, 2, 3, 4, 5)] == [2.0, 2.0, 2.0, 1.0, 0.5]
    constant = parse_run_config(fused_run_config({"server-learning-rate": 2.0, "server-learning-rate-decay": 0.5}))
    assert constant.server_step(50) == 2.0, "decay-from 0 means no decay"


def test_a_parsed_config_is_reused_but_a_wrongly_typed_value_is_still_refused():
    """Devices parse the run-config in every mod; the cache must not blur 1, 1.0 and True."""
    config = fused_run_config()
    assert parse_run_config(dict(config)) is parse_run_config(dict(config))
    assert parse_run_config(fused_run_config({"seed": 7})).seed == 7
    for key, value in (("report", 1), ("seed", 7.0), ("seed", True)):
        with pytest.raises(ConfigError, match=f"'{key}' must be"):
            parse_run_config({**config, key: value})
    with pytest.raises(ConfigError, match="'seed' must be int"):
        parse_run_config({**config, "seed": [1]})  # unhashable: parsed without the cache, still refused


def test_pyproject_run_config_is_the_code_defaults():
    """`flwr run` reads pyproject.toml, `fedrec` the code: the same keys, defaults and TOML types."""
    table = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"]
    code = default_run_config()
    assert sorted(set(table) - set(code)) == [], "keys in pyproject.toml but not in common/config.py FedRecConfig"
    assert sorted(set(code) - set(table)) == [], "keys in FedRecConfig but not in pyproject.toml"
    differ = {k: (table[k], code[k]) for k in code if (type(table[k]), table[k]) != (type(code[k]), code[k])}
    assert differ == {}, "pyproject.toml value vs code default (python -m common.config_keys --toml prints the table)"


def test_every_key_has_help_and_its_default_is_accepted():
    assert len(RUN_CONFIG_KEYS) == len({spec.name for spec in RUN_CONFIG_KEYS})
    for spec in RUN_CONFIG_KEYS:
        assert spec.help.strip() and spec.section, spec.name
    assert parse_run_config(default_run_config()) == FedRecConfig()


def test_configuration_reference_is_generated_from_the_code():
    """docs/configuration.md is what `python -m common.config_keys --markdown` prints today."""
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == to_markdown(RUN_CONFIG_KEYS), (
        "docs/configuration.md is stale: python -m common.config_keys --markdown > docs/configuration.md"
    )
    for spec in RUN_CONFIG_KEYS:
        assert f"| `{spec.name}` |" in committed


def test_ranges_and_choices_come_from_the_key_definitions():
    by_name = {spec.name: spec for spec in RUN_CONFIG_KEYS}
    assert by_name["fraction-train"].allowed() == "in (0, 1]"
    assert by_name["trim-fraction"].allowed() == "in [0, 0.5)"
    assert by_name["model"].allowed() == "mf | gmf | mlp | neumf | als | ease"
    with pytest.raises(ConfigError, match=r"record-dp-delta must be in \(0, 1\); got 1.0"):
        parse_run_config(fused_run_config({"record-dp-delta": 1.0}))
    with pytest.raises(ConfigError, match="exposure-item must be >= -1; got -2"):
        parse_run_config(fused_run_config({"exposure-item": -2}))
    with pytest.raises(ConfigError, match="dataset must be one of synthetic, movielens-100k"):
        parse_run_config(fused_run_config({"dataset": "movielens"}))


def test_a_hybrid_models_width_comes_from_the_catalogue_without_loading_the_interactions(monkeypatch):
    import common.federation

    def refuse(*args, **kwargs):
        raise AssertionError("reading config.model_config loaded the dataset")

    monkeypatch.setattr(common.federation, "prepare", refuse)
    monkeypatch.setattr(common.federation, "load_dataset", refuse)
    config = parse_run_config(fused_run_config({"item-features": True, "synthetic-users": 31}))
    assert config.model_config.content_features == 16  # the synthetic catalogue's tags
    assert parse_run_config(fused_run_config({"synthetic-users": 31})).model_config.content_features == 0


def test_config_does_not_import_the_data_pipeline():
    """common.config is read by every process; the federation module (data loading, splits) imports it, not back."""
    code = "import sys, common.config; print('common.federation' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "False"


def test_the_simulation_app_directory_gives_flower_the_code_defaults(tmp_path):
    """What every simulated SuperNode fuses its run-config from (an installed wheel has no pyproject.toml)."""
    from flwr.common.config import get_fused_config_from_dir

    from simulations.engine import write_app_config

    write_app_config(tmp_path)
    assert get_fused_config_from_dir(tmp_path, {}) == default_run_config()
    assert get_fused_config_from_dir(tmp_path, {"seed": 7})["seed"] == 7


def test_baseline_help_shows_its_defaults_and_the_run_config_values_they_differ_from(monkeypatch):
    from simulations.cli import build_parser

    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps at the terminal width, hyphens included
    baseline = build_parser()._subparsers._group_actions[0].choices["baseline"]
    text = " ".join(baseline.format_help().split())
    defaults = FedRecConfig()
    assert "(default: 0.001 " in text and "(default: 256;" in text and "(default: 20;" in text
    assert f"run-config learning-rate {defaults.learning_rate} " in text
    assert f"run-config batch-size {defaults.batch_size} " in text
    assert f"(default: {defaults.num_negatives}, as run-config num-negatives)" in text


def test_the_printed_toml_table_parses_to_the_defaults_and_the_command_prints_the_docs(capsys):
    from common.config_keys import main, to_toml

    table = tomllib.loads(to_toml(RUN_CONFIG_KEYS))["tool"]["flwr"]["app"]["config"]
    assert [(k, type(v), v) for k, v in table.items()] == [(k, type(v), v) for k, v in default_run_config().items()]
    assert main(["--markdown"]) == 0
    assert capsys.readouterr().out == (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
