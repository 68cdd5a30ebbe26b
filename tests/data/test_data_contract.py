"""Issue 22's table, row by row: a site's files are read by name, or refused before round 1.

Each test plays a bank branch's everyday data mistake. Before the data contract, every one of
them gave a wrong model with exit 0 (or a misleading hint); each now gives the same arrays
as the clean files, or a refusal naming the site, the file, the column and the fix.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fl_components.config import FederationConfig
from fl_components.errors import DataError
from fl_components.federation import Site, dataset_info

COLUMNS = ["age", "income", "debt", "years"]
runner = CliRunner()


def _frame(rows: int, *, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, len(COLUMNS)))
    frame = pd.DataFrame(x, columns=COLUMNS)
    frame["label"] = (x[:, 0] - 2 * x[:, 2] > 0).astype(int)
    return frame


def _write(folder: Path, train: pd.DataFrame, test: pd.DataFrame, *, kind: str = "csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, frame in (("train", train), ("test", test)):
        if kind == "csv":
            frame.to_csv(folder / f"{split}.csv", index=False)
        else:
            frame.to_parquet(folder / f"{split}.parquet")
    return folder


def _config(tmp_path: Path, sites: list[str], **data: Any) -> FederationConfig:
    return FederationConfig.model_validate(
        {
            "name": "branches",
            "sites": [{"name": s, "data_path": str(tmp_path / s)} for s in sites],
            "participation": {"min_participants": 1},
            "data": {"source": "site_files", "n_features": 4, "n_classes": 2, **data},
        }
    )


def _load(tmp_path: Path, site: str, config: FederationConfig) -> Any:
    return Site(site, tmp_path / site, config, dataset_info(config)).load()


def _yaml(tmp_path: Path, config: FederationConfig) -> Path:
    path = tmp_path / "federation.yaml"
    path.write_text(config.model_dump_json(exclude_unset=True))  # JSON is YAML
    return path


@pytest.mark.parametrize(
    "order",
    [[*COLUMNS[::-1], "label"], ["label", "age", "debt", "income", "years"]],
    ids=["reversed", "two-swapped"],
)
def test_a_site_whose_columns_are_in_another_order_reads_them_by_name(
    tmp_path: Path, order: list[str]
) -> None:
    train, test = _frame(60, seed=1), _frame(20, seed=2)
    _write(tmp_path / "east", train, test)
    _write(tmp_path / "west", train[order], test[order])
    config = _config(tmp_path, ["east", "west"])

    east, west = _load(tmp_path, "east", config), _load(tmp_path, "west", config)

    np.testing.assert_array_equal(west.train.features, east.train.features)
    np.testing.assert_array_equal(west.test.features, east.test.features)
    assert west.train.columns == tuple(sorted(COLUMNS))


def test_a_test_file_in_another_order_than_train_is_read_by_name(tmp_path: Path) -> None:
    train, test = _frame(60, seed=1), _frame(20, seed=2)
    _write(tmp_path / "east", train, test)
    _write(tmp_path / "west", train, test[["years", "label", "debt", "age", "income"]])
    config = _config(tmp_path, ["east", "west"])

    west = _load(tmp_path, "west", config)

    np.testing.assert_array_equal(west.test.features, _load(tmp_path, "east", config).test.features)


def test_a_site_missing_a_column_but_with_an_extra_one_is_refused_before_round_one(
    tmp_path: Path,
) -> None:
    train, test = _frame(60, seed=1), _frame(20, seed=2)
    _write(tmp_path / "east", train, test)
    renamed = {"debt": "arrears"}
    _write(tmp_path / "west", train.rename(columns=renamed), test.rename(columns=renamed))
    config = _config(tmp_path, ["east", "west"])

    result = runner.invoke(_app(), ["validate", "--data", str(_yaml(tmp_path, config))])

    assert result.exit_code == 2
    text = _flat(result.output)
    assert "site 'west'" in text and str(tmp_path / "west" / "train.csv") in text
    assert "lacks ['debt'] and has ['arrears']" in text and "data.columns" in text


def test_declared_columns_refuse_a_renamed_column_naming_file_and_fix(tmp_path: Path) -> None:
    train, test = _frame(60, seed=1), _frame(20, seed=2)
    renamed = {"debt": "arrears"}
    _write(tmp_path / "west", train.rename(columns=renamed), test.rename(columns=renamed))
    config = _config(tmp_path, ["west"], columns=COLUMNS)

    with pytest.raises(DataError) as error:
        _load(tmp_path, "west", config)

    message = str(error.value)
    assert message.startswith("site 'west': ") and str(tmp_path / "west" / "train.csv") in message
    assert "lacks column(s) ['debt']" in message
    assert "has column(s) ['arrears'] that data.columns does not list" in message
    assert "if 'arrears' is 'debt' under another name, rename it in the file" in message


def test_declared_columns_give_the_model_their_order_whatever_the_files(tmp_path: Path) -> None:
    train, test = _frame(60, seed=1), _frame(20, seed=2)
    shuffled = ["income", "label", "years", "age", "debt"]
    _write(tmp_path / "west", train[shuffled], test[shuffled])
    config = _config(tmp_path, ["west"], columns=COLUMNS)

    west = _load(tmp_path, "west", config)

    np.testing.assert_array_equal(west.train.features, train[COLUMNS].to_numpy(np.float32))
    assert west.train.columns == tuple(COLUMNS)


@pytest.mark.parametrize("stale", ["train.npz", "train.parquet"])
def test_an_old_file_beside_a_new_train_csv_is_refused_naming_both(
    tmp_path: Path, stale: str
) -> None:
    folder = _write(tmp_path / "east", _frame(96, seed=1), _frame(20, seed=2))
    old = _frame(50, seed=3)
    if stale.endswith(".npz"):
        np.savez(folder / stale, x=old[COLUMNS].to_numpy(), y=old["label"].to_numpy())
    else:
        old.to_parquet(folder / stale)
    os.utime(folder / stale, (1_700_000_000, 1_700_000_000))
    config = _config(tmp_path, ["east"])

    with pytest.raises(DataError) as error:
        _load(tmp_path, "east", config)

    message = str(error.value)
    assert f"site folder {folder} has 2 train files: " in message
    assert "train.csv (modified " in message and f"{stale} (modified 2023-11-14 " in message
    assert "keep one (the newest is train.csv) and delete or move the other(s)" in message


@pytest.mark.parametrize("scale", ["none", "site"])
def test_an_account_number_column_left_in_is_refused(tmp_path: Path, scale: str) -> None:
    train, test = _frame(60, seed=1), _frame(20, seed=2)
    train["account"] = np.arange(4_100_000, 4_100_060)
    test["account"] = np.arange(5_000_000, 5_000_020)
    _write(tmp_path / "east", train, test)
    config = _config(tmp_path, ["east"], n_features=5, scale=scale)

    with pytest.raises(DataError) as error:
        _load(tmp_path, "east", config)

    message = str(error.value)
    assert message.startswith("site 'east': ") and "train.csv: column 'account'" in message
    assert "different integer on every one of its 60 rows (e.g. 4100000" in message
    assert "looks like an ID" in message and "add it to data.drop" in message


def test_data_drop_leaves_the_id_out(tmp_path: Path) -> None:
    train, test = _frame(60, seed=1), _frame(20, seed=2)
    train["account"], test["account"] = np.arange(60), np.arange(20)
    _write(tmp_path / "east", train, test)
    config = _config(tmp_path, ["east"], drop=["account"])

    east = _load(tmp_path, "east", config)

    assert east.train.columns == tuple(sorted(COLUMNS))


def test_yes_no_labels_at_one_site_stop_the_run_before_any_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ops.cli import run as cli_run

    train, test = _frame(60, seed=1), _frame(20, seed=2)
    _write(tmp_path / "east", train, test)
    words = {0: "no", 1: "yes"}
    _write(
        tmp_path / "west",
        train.assign(label=train["label"].map(words)),
        test.assign(label=test["label"].map(words)),
    )
    started: list[FederationConfig] = []
    monkeypatch.setattr(cli_run, "train_and_report", lambda config, **_: started.append(config))
    config = _config(tmp_path, ["east", "west"])

    result = runner.invoke(_app(), ["run", str(_yaml(tmp_path, config))])

    assert result.exit_code == 2 and started == []
    text = _flat(result.output)
    assert "site 'west'" in text and "column 'label'" in text and "'no', 'yes'" in text
    assert "data.label_map: {'no': 0, 'yes': 1}" in text and "run not started" in text


def test_label_map_reads_yes_no_labels_at_every_site(tmp_path: Path) -> None:
    train, test = _frame(60, seed=1), _frame(20, seed=2)
    words = {0: "no", 1: "yes"}
    _write(
        tmp_path / "west",
        train.assign(label=train["label"].map(words)),
        test.assign(label=test["label"].map(words)),
    )
    config = _config(tmp_path, ["west"], label_map={"no": 0, "yes": 1})

    west = _load(tmp_path, "west", config)

    np.testing.assert_array_equal(west.train.labels, train["label"].to_numpy())


def test_a_label_outside_the_map_names_value_line_and_fix(tmp_path: Path) -> None:
    train, test = _frame(6, seed=1), _frame(4, seed=2)
    labels = ["no", "yes", "no", "maybe", "yes", "no"]
    _write(tmp_path / "west", train.assign(label=labels), test.assign(label="no"))
    config = _config(tmp_path, ["west"], label_map={"no": 0, "yes": 1})

    with pytest.raises(DataError) as error:
        _load(tmp_path, "west", config)

    message = str(error.value)
    assert "column 'label', has bad labels: 1 label(s) not in data.label_map ('no', 'yes')" in (
        message
    )
    assert "values 'maybe', at line 5" in message and "add each value to data.label_map" in message


def test_a_semicolon_csv_is_named_with_the_delimiter_to_set(tmp_path: Path) -> None:
    folder = tmp_path / "east"
    folder.mkdir()
    text = "age;income;debt;years;label\n1,5;2,25;0,5;3;1\n-0,5;1;2,5;4;0\n"
    (folder / "train.csv").write_text(text)
    (folder / "test.csv").write_text(text)

    with pytest.raises(DataError) as error:
        _load(tmp_path, "east", _config(tmp_path, ["east"]))

    message = str(error.value)
    assert str(folder / "train.csv") in message and "separated by ';'" in message
    assert "set data.delimiter: ';' and data.decimal: ','" in message
    assert "data.label_column" not in message


def test_a_semicolon_decimal_comma_csv_reads_right_with_its_dialect(tmp_path: Path) -> None:
    folder = tmp_path / "east"
    folder.mkdir()
    text = "age;income;debt;years;label\n1,5;2,25;0,5;3;1\n-0,5;1;2,5;4;0\n"
    (folder / "train.csv").write_text(text)
    (folder / "test.csv").write_text(text)
    config = _config(tmp_path, ["east"], delimiter=";", decimal=",")

    east = _load(tmp_path, "east", config)

    # sorted by name: age, debt, income, years
    np.testing.assert_allclose(east.train.features, [[1.5, 0.5, 2.25, 3], [-0.5, 2.5, 1, 4]])


def test_a_decimal_comma_without_its_setting_says_which(tmp_path: Path) -> None:
    folder = tmp_path / "east"
    folder.mkdir()
    text = "age;income;debt;years;label\n1,5;2,25;0,5;3;1\n-0,5;1;2,5;4;0\n"
    (folder / "train.csv").write_text(text)
    (folder / "test.csv").write_text(text)

    with pytest.raises(DataError) as error:
        _load(tmp_path, "east", _config(tmp_path, ["east"], delimiter=";"))

    assert "decimal comma: set data.decimal: ','" in str(error.value)


def test_a_missing_site_folder_fails_validate_data_naming_site_and_fix(tmp_path: Path) -> None:
    _write(tmp_path / "east", _frame(60, seed=1), _frame(20, seed=2))
    config = _config(tmp_path, ["east", "west"])

    result = runner.invoke(_app(), ["validate", "--data", str(_yaml(tmp_path, config))])

    assert result.exit_code == 2
    text = _flat(result.output)
    assert f"site 'west': site folder {tmp_path / 'west'} does not exist" in text
    assert "fix sites[].data_path" in text and "fedpipe partition" not in text


def test_a_utf8_bom_does_not_hide_the_first_column(tmp_path: Path) -> None:
    # a guard: pandas already skipped the BOM before the contract; read_csv keeps it skipped
    train, test = _frame(60, seed=1), _frame(20, seed=2)
    folder = _write(tmp_path / "east", train, test)
    for name in ("train.csv", "test.csv"):
        (folder / name).write_bytes(b"\xef\xbb\xbf" + (folder / name).read_bytes())
    _write(tmp_path / "west", train, test)
    config = _config(tmp_path, ["east", "west"])

    east = _load(tmp_path, "east", config)

    np.testing.assert_array_equal(
        east.train.features, _load(tmp_path, "west", config).train.features
    )


def test_categorical_columns_are_one_hot_encoded_from_declared_levels(tmp_path: Path) -> None:
    train, test = _frame(6, seed=1), _frame(3, seed=2)
    train["region"] = ["north", "south", "north", "east", "south", "north"]
    test["region"] = ["east", "east", "north"]
    _write(tmp_path / "east", train, test, kind="parquet")
    config = _config(
        tmp_path,
        ["east"],
        n_features=None,
        columns=["region", "age"],
        drop=["income", "debt", "years"],
        categorical={"region": ["north", "south", "east"]},
    )

    east = _load(tmp_path, "east", config)

    assert config.data.n_features == 4
    assert east.test.columns == ("region=north", "region=south", "region=east", "age")
    np.testing.assert_array_equal(east.test.features[:, :3], [[0, 0, 1], [0, 0, 1], [1, 0, 0]])


def test_npz_with_a_columns_array_is_read_by_name(tmp_path: Path) -> None:
    train, test = _frame(30, seed=1), _frame(10, seed=2)
    folder = tmp_path / "east"
    folder.mkdir()
    order = ["years", "age", "debt", "income"]
    for split, frame in (("train", train), ("test", test)):
        np.savez(
            folder / f"{split}.npz",
            x=frame[order].to_numpy(),
            y=frame["label"].to_numpy(),
            columns=np.array(order),
        )
    config = _config(tmp_path, ["east"], columns=COLUMNS)

    east = _load(tmp_path, "east", config)

    np.testing.assert_allclose(east.train.features, train[COLUMNS].to_numpy(np.float32))


def test_a_run_pins_the_columns_every_site_holds(tmp_path: Path) -> None:
    from fl_components.data.check import check_sites, pin_columns

    train, test = _frame(60, seed=1), _frame(20, seed=2)
    _write(tmp_path / "east", train, test)
    _write(tmp_path / "west", train[[*COLUMNS[::-1], "label"]], test)
    config = _config(tmp_path, ["east", "west"])

    check = check_sites(config)
    pinned = pin_columns(config, check)

    assert check.ok and pinned.data.columns == tuple(sorted(COLUMNS))
    assert [row.label_counts for row in check.sites] == [tuple(np.bincount(train["label"]))] * 2


def test_data_check_of_four_sites_of_10k_rows_takes_seconds(tmp_path: Path) -> None:
    sites = ["a", "b", "c", "d"]
    for i, name in enumerate(sites):
        _write(tmp_path / name, _frame(10_000, seed=i), _frame(2_000, seed=10 + i))
    config = _config(tmp_path, sites)

    started = time.perf_counter()
    result = runner.invoke(_app(), ["data", "check", str(_yaml(tmp_path, config))])
    seconds = time.perf_counter() - started

    assert result.exit_code == 0, result.output
    assert "site data matches the contract" in result.output and seconds < 5


def test_a_declared_id_like_column_is_kept_but_named_by_the_check(tmp_path: Path) -> None:
    from fl_components.data.check import check_sites

    train, test = _frame(60, seed=1), _frame(20, seed=2)
    train["account"], test["account"] = np.arange(60), np.arange(20)
    _write(tmp_path / "east", train, test)
    config = _config(tmp_path, ["east"], n_features=5, columns=[*COLUMNS, "account"])

    check = check_sites(config)

    assert check.ok and check.sites[0].id_like == ("account",)
    assert "column(s) ['account'] differ on every row (an ID?)" in check.warnings[0]
    assert "move them from data.columns to data.drop" in check.warnings[0]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"label_map": {True: 1, False: 0}}, "quote the label values"),
        ({"columns": ["age"], "drop": ["age"]}, "data.columns and data.drop both name ['age']"),
        ({"categorical": {"region": ["a", "b"]}}, "data.categorical (region) needs data.columns"),
        ({"columns": ["a", "b"], "n_features": 3}, "data.n_features is 3 but data.columns gives 2"),
        ({"label_map": {"no": 0, "yes": 2}, "n_classes": 2}, "maps {'yes': 2} outside 0..1"),
        ({"delimiter": ",", "decimal": ","}, "a CSV with a decimal comma separates fields"),
    ],
)
def test_contract_settings_that_contradict_each_other_are_refused(
    data: dict[str, Any], message: str
) -> None:
    from fl_components.config import config_from_dict
    from fl_components.errors import ConfigError

    width = {} if "columns" in data else {"n_features": 4}  # else derived from the columns
    raw = {
        "sites": [{"name": "east", "data_path": "east"}],
        "participation": {"min_participants": 1},
        "data": {"source": "site_files", "n_classes": 2, **width, **data},
    }

    with pytest.raises(ConfigError) as error:
        config_from_dict(raw)

    assert message in " ".join(str(error.value).split())


def test_contract_settings_with_bundled_data_are_refused() -> None:
    from fl_components.config import config_from_dict
    from fl_components.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data\.columns is set but data\.source is 'bundled'"):
        config_from_dict({"data": {"columns": ["a"]}})


def _app() -> Any:
    from ops.cli.main import app

    return app


def _flat(output: str) -> str:
    """Rich wraps long lines at the terminal width; join them back."""
    return " ".join(output.split())


@pytest.mark.parametrize("broken", [False, True])
def test_the_own_files_example_checks_clean_and_its_broken_variant_is_refused(
    tmp_path: Path, broken: bool
) -> None:
    import importlib.util

    from fl_components.config import load_config
    from fl_components.data.check import check_sites

    examples = Path(__file__).resolve().parents[2] / "examples"
    spec = importlib.util.spec_from_file_location(
        "make_bank_files", examples / "make_bank_files.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = load_config(examples / "bank-branches-own-files.yaml")
    raw = config.model_dump(mode="json", exclude_unset=True)
    for site in raw["sites"]:
        site["data_path"] = str(tmp_path / site["name"])
    config = FederationConfig.model_validate(raw)
    module.write(tmp_path, broken=broken)

    check = check_sites(config)

    if not broken:
        assert check.ok, check.problems
        assert [row.train_rows for row in check.sites] == [960, 2880, 480, 1200]
    else:
        assert len(check.problems) == 4
        for part in ("2 train files", "lacks column(s) ['debt']", "'maybe'", "does not exist"):
            assert any(part in line for line in check.problems), part
