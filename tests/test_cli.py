"""The fedrec command: bad input ends in one line and a non-zero exit; baselines print tables."""

from __future__ import annotations

import pytest

from simulations.cli import main

BAD_FILES = {
    "missing-file": (None, "ratings.csv: no such file"),
    "empty": ("", "empty"),
    "wrong-delimiter": ("user;item;rating\n1;2;5\n", "looks ';'-separated"),
    "missing-column": ("user,product\n1,2\n", "item"),
    "non-numeric-id": ("user,item\n1,2\nabc,3\n", "ratings.csv:3: user id 'abc' is not an integer"),
    "non-numeric-rating": ("user,item,rating\n1,2,5\n1,3,great\n", "ratings.csv:3: rating 'great' is not a number"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_csv_exits_2_with_one_line_naming_the_problem(case, tmp_path, capsys):
    content, needle = BAD_FILES[case]
    path = tmp_path / "ratings.csv"
    if content is not None:
        path.write_text(content)
    code = main(
        ["baseline", "--model", "itempop", "--dataset", "csv", "--data-path", str(path),
         "-c", "csv-rating-col='rating'" if "rating" in (content or "") else "csv-rating-col=''"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("fedrec: error: ")
    assert needle in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_bad_movielens_folder_names_what_was_expected(tmp_path, capsys):
    code = main(["baseline", "--model", "itempop", "--dataset", "movielens-100k", "--data-path", str(tmp_path)])
    assert code == 2
    assert "u.data" in capsys.readouterr().err


def test_unknown_run_config_key_is_rejected(capsys):
    assert main(["baseline", "--model", "itempop", "-c", "learning-rat=0.1"]) == 2
    assert "unknown run-config key" in capsys.readouterr().err


def test_itempop_and_trained_baseline_on_synthetic_data(capsys):
    code = main(
        ["baseline", "--model", "itempop", "-c", "synthetic-users=150 synthetic-items=300"]
    ) + main(
        ["baseline", "--model", "gmf", "--epochs", "2", "--dim", "8", "-c", "synthetic-users=150 synthetic-items=300"]
    )
    out = capsys.readouterr().out
    assert code == 0
    rows = {line.split("|")[1].strip(): line.split("|")[2:] for line in out.splitlines() if line.startswith("| ") and "model" not in line}
    assert set(rows) == {"itempop", "gmf"}
    for cells in rows.values():
        assert 0.0 <= float(cells[0]) <= 1.0  # HR@10
    assert rows["gmf"][-3].strip() in {"1/2", "2/2"}  # best epoch of 2



@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_trained_baseline_uses_the_run_configs_optimizer(monkeypatch, capsys, optimizer):
    """`-c local-optimizer=...` reaches the centralized training, not silently Adam."""
    import simulations.baselines as baselines

    seen = []
    real = baselines.make_optimizer
    monkeypatch.setattr(baselines, "make_optimizer", lambda model, config: seen.append(config.optimizer) or real(model, config))
    code = main(["baseline", "--model", "gmf", "--epochs", "1", "--dim", "4",
                 "-c", f'synthetic-users=150 synthetic-items=300 local-optimizer="{optimizer}"'])
    assert code == 0 and seen == [optimizer]

def test_too_few_items_for_the_evaluation_negatives_is_a_config_error(capsys):
    assert main(["baseline", "--model", "itempop", "-c", "synthetic-users=50 synthetic-items=60"]) == 2
    err = capsys.readouterr().err
    assert "eval-negatives" in err and "Traceback" not in err


def test_explicit_ratings_baseline_reports_rmse_and_mae(capsys):
    code = main(["baseline", "--model", "mf", "--loss", "mse", "--epochs", "2", "--dim", "8", "--lr", "0.01",
                 "-c", "synthetic-users=150 synthetic-items=300"])
    out = capsys.readouterr().out
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("mf: rating RMSE"))
    rmse_value = float(line.split()[3])
    assert 0.0 < rmse_value < 4.0  # ratings are 1..5: a trained model is well inside the range
