import sys
from pathlib import Path

import numpy as np
import pytest

import common.loaders as loaders
from common.datasets import DATASET_NAMES, dataset_summary, load_dataset
from common.errors import DataError
from common.loaders import load_csv, load_movielens, load_parquet

ML100K = "196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n196\t377\t4\t881250950\n"
ML1M = "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4.5::978298413\n"
ML25M = "userId,movieId,rating,timestamp\n1,296,5.0,1147880044\n1,306,3.5,1147868817\n3,296,0.5,1439472215\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode())
    return path


def raises_data_error(fn, *args, **kwargs) -> DataError:
    with pytest.raises(DataError) as exc:
        fn(*args, **kwargs)
    err = exc.value
    assert "\n" not in str(err), "DataError must print as one line"
    return err


# --- MovieLens formats -------------------------------------------------------


def test_ml100k_folder_and_file(tmp_path):
    write(tmp_path / "ml-100k" / "u.data", ML100K)
    for target in (tmp_path / "ml-100k", tmp_path / "ml-100k" / "u.data"):
        d = load_movielens(target)
        assert (d.num_users, d.num_items, len(d)) == (3, 3, 4)
        assert d.user_ids.tolist() == [22, 186, 196]
        assert d.item_ids.tolist() == [242, 302, 377]
        assert d.ratings.tolist() == [3.0, 3.0, 1.0, 4.0]
        assert d.timestamps.tolist() == [881250949, 891717742, 878887116, 881250950]


def test_ml1m_dat_with_double_colon_and_half_stars(tmp_path):
    d = load_movielens(write(tmp_path / "ratings.dat", ML1M))
    assert d.user_ids.tolist() == [1, 2]
    assert d.item_ids.tolist() == [661, 1193]
    assert d.ratings.tolist() == [5.0, 3.0, 4.5]


def test_ml25m_csv_with_header(tmp_path):
    d = load_movielens(write(tmp_path / "ml-25m" / "ratings.csv", ML25M))
    assert len(d) == 3
    assert d.ratings.tolist() == [5.0, 3.5, 0.5]
    assert d.timestamps[2] == 1439472215


def test_movielens_duplicates_keep_latest(tmp_path):
    text = "1\t5\t2\t100\n1\t5\t4\t300\n1\t5\t3\t200\n"
    d = load_movielens(write(tmp_path / "u.data", text))
    assert len(d) == 1 and d.ratings[0] == 4.0


def test_crlf_and_blank_lines_are_accepted(tmp_path):
    d = load_movielens(write(tmp_path / "u.data", "1\t2\t3\t4\r\n\r\n5\t6\t7\t8\r\n"))
    assert len(d) == 2


def test_many_blocks_parse_and_report_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(loaders, "_BLOCK_BYTES", 64)  # force many loadtxt blocks
    lines = [f"{u}\t{u % 7}\t{u % 5 + 1}\t{1000 + u}" for u in range(200)]
    d = load_movielens(write(tmp_path / "u.data", "\n".join(lines) + "\n"))
    assert len(d) == 200 and d.timestamps[-1] == 1199
    lines[150] = "150\t3\toops\t1150"
    err = raises_data_error(load_movielens, write(tmp_path / "u.data", "\n".join(lines) + "\n"))
    assert err.line == 151 and "rating 'oops' is not a number" in err.message


# --- MovieLens error cases -----------------------------------------------------


def test_missing_movielens_dir_names_path_and_expected_files(tmp_path):
    err = raises_data_error(load_movielens, tmp_path / "nope")
    assert err.path == str(tmp_path / "nope")
    assert "u.data" in err.message and "ratings.dat" in err.message and "ratings.csv" in err.message


def test_folder_without_ratings_file(tmp_path):
    write(tmp_path / "u.item", "1|Toy Story\n")
    err = raises_data_error(load_movielens, tmp_path)
    assert "no MovieLens ratings file" in err.message and "u.data" in err.message


def test_empty_file(tmp_path):
    err = raises_data_error(load_movielens, write(tmp_path / "u.data", ""))
    assert "empty" in err.message and err.path.endswith("u.data")


def test_header_only_csv(tmp_path):
    err = raises_data_error(load_movielens, write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n"))
    assert "header but no data rows" in err.message


def test_wrong_delimiter_is_detected_on_line_1(tmp_path):
    err = raises_data_error(load_movielens, write(tmp_path / "u.data", "1,2,3,4\n5,6,7,8\n"))
    assert err.line == 1
    assert "line 1 has 1 field, expected 4 separated by tab" in err.message
    assert "','-separated" in err.message
    assert str(err).startswith(f"{tmp_path / 'u.data'}:1: ")


def test_wrong_field_count_on_later_line(tmp_path):
    text = "1\t2\t3\t4\n1\t3\t3\t4\n\n2\t2\t5\n"
    err = raises_data_error(load_movielens, write(tmp_path / "u.data", text))
    assert err.line == 4 and "has 3 fields, expected 4" in err.message


def test_too_many_fields(tmp_path):
    err = raises_data_error(load_movielens, write(tmp_path / "ratings.dat", "1::2::3::4\n1::2::3::4::5\n"))
    assert err.line == 2 and "has 5 fields, expected 4 separated by '::'" in err.message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("abc\t2\t3\t4", "user id 'abc' is not an integer"),
        ("1\t2.5\t3\t4", "item id '2.5' is not an integer"),
        ("1\t2\tx\t4", "rating 'x' is not a number"),
        ("1\t2\tnan\t4", "rating 'nan' is not finite"),
        ("1\t2\t-inf\t4", "rating '-inf' is not finite"),
        ("1\t2\t1e40\t4", "rating '1e40' is out of range"),
        ("1\t2\t3\t2020-01-01", "timestamp '2020-01-01' is not an integer"),
        ("1\t2\t3\t", "timestamp '' is not an integer"),
        ("99999999999999999999\t2\t3\t4", "does not fit in 64 bits"),
    ],
)
def test_bad_values_name_field_and_line(tmp_path, line, expected):
    text = "1\t1\t5\t9\n2\t1\t4\t9\n" + line + "\n3\t1\t4\t9\n"
    err = raises_data_error(load_movielens, write(tmp_path / "u.data", text))
    assert err.line == 3
    assert expected in err.message


def test_non_finite_rating_in_csv_reports_physical_line(tmp_path):
    text = "userId,movieId,rating,timestamp\n\n1,2,3.5,4\n1,3,inf,5\n"
    err = raises_data_error(load_movielens, write(tmp_path / "ratings.csv", text))
    assert err.line == 4 and "rating 'inf' is not finite" in err.message


# --- generic CSV -------------------------------------------------------------


def test_csv_by_name_without_rating_or_timestamp(tmp_path):
    path = write(tmp_path / "x.csv", "item,extra text,user\n7,hello world,1\n8,,1\n7,x,2\n")
    d = load_csv(path, user_col="user", item_col="item")
    assert d.ratings.tolist() == [1.0, 1.0, 1.0]
    assert d.timestamps.tolist() == [0, 1, 2]
    assert d.user_ids.tolist() == [1, 2] and d.item_ids.tolist() == [7, 8]


def test_csv_by_index_without_header_and_other_delimiter(tmp_path):
    path = write(tmp_path / "x.tsv", "5;1;2.5;100\n6;1;4;50\n")
    d = load_csv(path, user_col=1, item_col=0, rating_col=2, timestamp_col=3, delimiter=";", has_header=False)
    assert d.user_ids.tolist() == [1] and d.item_ids.tolist() == [5, 6]
    assert d.ratings.tolist() == [2.5, 4.0] and d.timestamps.tolist() == [100, 50]


def test_csv_missing_column_lists_found_columns(tmp_path):
    path = write(tmp_path / "x.csv", "userId,movieId,score\n1,2,3\n")
    err = raises_data_error(load_csv, path, user_col="userId", item_col="movieId", rating_col="rating")
    assert err.line == 1
    assert "missing column 'rating'" in err.message
    assert "'userId', 'movieId', 'score'" in err.message


def test_csv_header_with_wrong_delimiter_gets_a_hint(tmp_path):
    path = write(tmp_path / "x.csv", "userId\tmovieId\n1\t2\n")
    err = raises_data_error(load_csv, path, user_col="userId", item_col="movieId")
    assert "missing column 'userId'" in err.message and "tab-separated" in err.message


def test_csv_field_count_on_later_line_with_unused_columns(tmp_path):
    path = write(tmp_path / "x.csv", "u,i,note\n1,2,a\n1,3,b,extra\n")
    err = raises_data_error(load_csv, path, user_col="u", item_col="i")
    assert err.line == 3 and "has 4 fields, expected 3" in err.message


def test_csv_index_out_of_range_and_name_without_header(tmp_path):
    path = write(tmp_path / "x.csv", "1,2\n")
    err = raises_data_error(load_csv, path, user_col=0, item_col=5, has_header=False)
    assert "item id column index 5 is out of range" in err.message and err.line == 1
    err = raises_data_error(load_csv, path, user_col="u", item_col=1, has_header=False)
    assert "has_header=False" in err.message


def test_csv_missing_and_empty_file(tmp_path):
    err = raises_data_error(load_csv, tmp_path / "none.csv", user_col="u", item_col="i")
    assert "no such file" in err.message and err.path.endswith("none.csv")
    err = raises_data_error(load_csv, write(tmp_path / "e.csv", "\n\n"), user_col="u", item_col="i")
    assert err.message == "file is empty"


def test_csv_utf8_bom_header(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffuser,item\n1,2\n".encode("utf-8"))
    assert len(load_csv(path, user_col="user", item_col="item")) == 1


# --- Parquet -----------------------------------------------------------------


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` fail
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "x.parquet"
    err = raises_data_error(load_parquet, path, user_col="u", item_col="i")
    assert err.message == "reading Parquet needs pyarrow: pip install 'fedrec[parquet]'"
    assert err.path == str(path)


def test_parquet_happy_path_and_missing_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "x.parquet"
    table = pa.table({"u": [5, 5, 9], "i": [1, 2, 1], "r": [4.0, 2.5, 1.0], "t": [3, 2, 1]})
    pq.write_table(table, path)
    d = load_parquet(path, user_col="u", item_col="i", rating_col="r", timestamp_col="t")
    assert d.user_ids.tolist() == [5, 9] and d.ratings.tolist() == [4.0, 2.5, 1.0]
    err = raises_data_error(load_parquet, path, user_col="user", item_col="i")
    assert "missing column 'user'" in err.message and "'u', 'i', 'r', 't'" in err.message


# --- load_dataset / summary ------------------------------------------------------


def test_load_dataset_synthetic_and_summary():
    d = load_dataset("synthetic", num_users=50, num_items=40, seed=3, mean_interactions=8)
    s = dataset_summary(d)
    assert (s["users"], s["items"], s["interactions"]) == (50, 40, len(d))
    assert s["density"] == pytest.approx(len(d) / 2000)
    counts = d.user_counts()
    assert s["min_interactions_per_user"] == counts.min() >= 5
    assert s["max_interactions_per_user"] == counts.max() <= 20
    assert s["median_interactions_per_user"] == float(np.median(counts))


def test_load_dataset_movielens_and_implicit(tmp_path):
    write(tmp_path / "u.data", ML100K)
    d = load_dataset("movielens-100k", path=tmp_path, implicit_threshold=3)
    assert len(d) == 3 and d.ratings.tolist() == [1.0, 1.0, 1.0]
    assert d.num_users == 3  # id space kept: user 22 has no rows left


def test_load_dataset_csv_passes_options(tmp_path):
    path = write(tmp_path / "x.csv", "a,b\n1,2\n")
    assert len(load_dataset("csv", path=path, user_col="a", item_col="b")) == 1


def test_load_dataset_errors(tmp_path):
    err = raises_data_error(load_dataset, "movielens-1m")
    assert "--data-path" in err.message and "download" in err.message
    err = raises_data_error(load_dataset, "netflix")
    assert "unknown dataset 'netflix'" in err.message
    assert all(name in err.message for name in DATASET_NAMES)
    write(tmp_path / "u.data", ML100K)
    err = raises_data_error(load_dataset, "movielens-25m", path=tmp_path)
    assert "does not look like movielens-25m" in err.message
    err = raises_data_error(load_dataset, "synthetic", bogus=1)
    assert "unknown dataset option(s): bogus" in err.message
    err = raises_data_error(load_dataset, "csv", path=tmp_path / "u.data", item_col="i")
    assert "needs the option(s) user_col" in err.message


def test_load_dataset_ignores_options_meant_for_other_datasets(tmp_path):
    # The CLI passes its whole config; CSV options must not break synthetic/MovieLens.
    common = dict(user_col="u", item_col="i", rating_col=None, delimiter=",", mean_interactions=6)
    d = load_dataset("synthetic", num_users=20, num_items=30, **common)
    assert 4 < len(d) / 20 < 9
    write(tmp_path / "u.data", ML100K)
    assert len(load_dataset("movielens-100k", path=tmp_path, **common)) == 4


def test_error_in_later_block_reports_physical_line(tmp_path, monkeypatch):
    monkeypatch.setattr(loaders, "_BLOCK_BYTES", 50)
    lines = ["userId,movieId,rating,timestamp"] + [f"{u},{u},3.0,{u}" for u in range(1, 120)]
    lines[100] = "100,100,nan,100"  # physical line 101
    err = raises_data_error(load_movielens, write(tmp_path / "ratings.csv", "\r\n".join(lines) + "\r\n"))
    assert err.line == 101 and "rating 'nan' is not finite" in err.message


def test_no_header_file_with_bom(tmp_path):
    path = tmp_path / "u.data"
    path.write_bytes(b"\xef\xbb\xbf1\t2\t3\t4\n")
    assert load_movielens(path).user_ids.tolist() == [1]
