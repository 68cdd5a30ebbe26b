"""A site's own files are checked when loaded: every refusal names file, column, rows and fix."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fl_components.config import FederationConfig, config_from_dict
from fl_components.data.site_files import (
    load_site,
    read_split,
    standardize_site,
    unscaled_columns,
    validate_labels,
)
from fl_components.data.types import SiteData, Split
from fl_components.errors import ConfigError, DataError
from fl_components.federation import Site, dataset_info


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _refusal(path: Path, *, n_classes: int | None = 2) -> str:
    with pytest.raises(DataError) as error:
        read_split(path, n_classes=n_classes)
    return str(error.value)


def test_missing_labels_name_file_column_lines_and_fix(tmp_path: Path) -> None:
    path = _csv(tmp_path / "train.csv", "a,b,label\n1,2,0\n3,4,\n5,6,1\n7,8,\n")

    message = _refusal(path)

    assert str(path) in message and "column 'label'" in message
    assert "2 missing label(s) at lines 3, 5 (counting the header as line 1)" in message
    assert "fill them in or drop those rows" in message
    assert "9223372036854775808" not in message


def test_non_integer_labels_are_refused_not_truncated(tmp_path: Path) -> None:
    path = _csv(tmp_path / "train.csv", "a,label\n1,0.5\n2,1\n3,1.5\n")

    message = _refusal(path)

    assert str(path) in message and "column 'label'" in message
    assert "2 non-integer label(s), values 0.5, 1.5, at lines 2, 4" in message
    assert "map them to integers" in message


def test_labels_outside_n_classes_name_the_setting(tmp_path: Path) -> None:
    path = _csv(tmp_path / "test.csv", "a,label\n1,0\n2,3\n3,-1\n4,1\n")

    message = _refusal(path, n_classes=3)

    assert str(path) in message and "column 'label'" in message
    assert "2 label(s) outside [0, 3), values 3, -1, at lines 3, 4" in message
    assert "remap them to 0..2 or raise data.n_classes (now 3)" in message


def test_string_labels_ask_for_class_indices(tmp_path: Path) -> None:
    path = _csv(tmp_path / "train.csv", "a,diagnosis\n1,benign\n2,1\n3,malignant\n")

    with pytest.raises(DataError) as error:
        read_split(path, label_column="diagnosis", n_classes=2)

    message = str(error.value)
    assert str(path) in message and "column 'diagnosis'" in message
    assert "2 non-numeric label(s), values 'benign', 'malignant', at lines 2, 4" in message
    assert "map each class to an integer 0..1" in message


def test_every_kind_of_bad_label_is_reported_at_once(tmp_path: Path) -> None:
    path = _csv(tmp_path / "train.csv", "a,label\n1,\n2,x\n3,0.5\n4,9\n5,1\n")

    message = _refusal(path)

    for part in ("missing label(s) at line 2", "non-numeric", "non-integer", "outside [0, 2)"):
        assert part in message


def test_many_bad_rows_show_the_first_five_and_a_count(tmp_path: Path) -> None:
    rows = "".join(f"{i},{i + 10}\n" for i in range(12))
    path = _csv(tmp_path / "train.csv", "a,label\n" + rows)

    message = _refusal(path)

    assert "12 label(s) outside [0, 2)" in message
    assert "lines 2, 3, 4, 5, 6 and 7 more" in message


def test_missing_label_column_names_file_columns_and_setting(tmp_path: Path) -> None:
    path = _csv(tmp_path / "train.csv", "age,bp\n1,2\n")

    message = _refusal(path)

    assert str(path) in message and "no column 'label' (columns: age, bp)" in message
    assert "set data.label_column" in message


def test_empty_file_is_named_with_the_layout_to_write(tmp_path: Path) -> None:
    path = _csv(tmp_path / "train.csv", "")

    message = _refusal(path)

    assert f"{path} is empty (no header, no rows)" in message
    assert "header naming the feature columns and 'label'" in message


def test_header_only_file_is_not_called_non_numeric(tmp_path: Path) -> None:
    path = _csv(tmp_path / "train.csv", "age,bp,label\n")

    message = _refusal(path)

    assert f"{path} has a header (age, bp, label) but no data rows" in message
    assert "add one row per example" in message and "non-numeric" not in message


def test_only_a_label_column_asks_for_features(tmp_path: Path) -> None:
    path = _csv(tmp_path / "train.csv", "label\n0\n1\n")

    assert "only the label column 'label'; add the feature columns" in _refusal(path)


def test_non_numeric_features_name_columns_and_a_sample_row(tmp_path: Path) -> None:
    path = _csv(tmp_path / "train.csv", "age,sex,ward,label\n50,1,3,0\n61,F,east,1\n")

    message = _refusal(path)

    assert str(path) in message and "non-numeric feature column(s) ['sex', 'ward']" in message
    assert "e.g. sex='F', ward='east' at line 3 (counting the header as line 1)" in message
    assert "encode them as numbers" in message


def test_unreadable_bytes_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_bytes(b"a,label\n\xff\xfe,1\n")

    message = _refusal(path)

    assert f"{path} is not a readable UTF-8 CSV (UnicodeDecodeError" in message


def test_nan_features_name_columns_and_lines(tmp_path: Path) -> None:
    path = _csv(tmp_path / "train.csv", "a,b,label\n1,2,0\n3,,1\n")

    message = _refusal(path)

    assert "NaN or infinity" in message and "in column(s) ['b'] at line 3" in message
    assert str(path) in message


def test_parquet_rows_are_counted_from_one(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    pd.DataFrame({"a": [1.0, 2.0, 3.0], "label": [0.0, 0.5, np.nan]}).to_parquet(path)

    message = _refusal(path)

    assert str(path) in message and "column 'label'" in message
    assert "missing label(s) at row 3 (1-based, not counting the header)" in message
    assert "non-integer label(s), values 0.5, at row 2" in message


def test_header_only_parquet_is_named(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    pd.DataFrame({"a": pd.Series([], dtype=float), "label": pd.Series([], dtype=int)}).to_parquet(
        path
    )

    assert f"{path} has a header (a, label) but no data rows" in _refusal(path)


def test_npz_labels_are_checked_by_index(tmp_path: Path) -> None:
    path = tmp_path / "train.npz"
    np.savez(path, x=np.zeros((3, 2), np.float32), y=np.array([0.0, 2.0, 0.5]))

    message = _refusal(path)

    assert f"{path}, array 'y'," in message
    assert "non-integer label(s), values 0.5, at index 2 of y (0-based)" in message
    assert "outside [0, 2), values 2.0, at index 1" in message


def test_npz_string_labels_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "train.npz"
    np.savez(path, x=np.zeros((2, 1), np.float32), y=np.array(["cat", "1"]))

    assert "1 non-numeric label(s), values 'cat', at index 0" in _refusal(path)


def test_good_labels_pass_in_every_form() -> None:
    for raw in ([0, 1, 1], [0.0, 1.0, 1.0], ["0", "1", "1"], [False, True, True]):
        labels = validate_labels(np.array(raw), source="x.csv", n_classes=2)
        assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 1]


def test_without_n_classes_negative_and_huge_labels_are_refused() -> None:
    with pytest.raises(DataError, match="outside"):
        validate_labels(np.array([0, -1]), source="y")
    with pytest.raises(DataError, match="outside"):
        validate_labels(np.array([1e30]), source="y")


def _site_files(folder: Path, *, scale: float, offset: float, label_column: str = "label") -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", 40), ("test", 10)):
        x = rng.normal(size=(rows, 3))
        frame = pd.DataFrame(x * scale + offset, columns=["age", "bp", "chol"])
        frame["bp"] = x[:, 1]  # one column already scaled
        frame[label_column] = (x[:, 0] > 0).astype(int)
        frame.to_csv(folder / f"{split}.csv", index=False)


def _site(folder: Path, *, scale: str = "none", n_classes: int = 2) -> Site:
    config = FederationConfig.model_validate(
        {
            "name": "own",
            "sites": [{"name": "clinic", "data_path": str(folder)}],
            "participation": {"min_participants": 1},
            "data": {
                "source": "site_files",
                "n_features": 3,
                "n_classes": n_classes,
                "scale": scale,
            },
        }
    )
    return Site("clinic", folder, config, dataset_info(config))


def test_site_load_checks_labels_against_n_classes(tmp_path: Path) -> None:
    _site_files(tmp_path / "clinic", scale=1.0, offset=0.0)
    train = tmp_path / "clinic" / "train.csv"
    frame = pd.read_csv(train)
    frame.loc[4, "label"] = 5
    frame.to_csv(train, index=False)

    with pytest.raises(DataError) as error:
        _site(tmp_path / "clinic").load()

    message = str(error.value)
    assert message.startswith("site 'clinic': ") and f"{train}, column 'label'" in message
    assert "1 label(s) outside [0, 2), values 5, at line 6" in message
    assert "raise data.n_classes (now 2)" in message


def test_unscaled_site_files_log_one_warning_naming_columns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _site_files(tmp_path / "clinic", scale=40.0, offset=120.0)
    site = _site(tmp_path / "clinic")

    with caplog.at_level(logging.WARNING, logger="fl_components.task.builtin"):
        site.load()
        site.load()  # every job loads the files again: said once per file version

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    (message,) = warnings
    assert message.startswith("site clinic: ") and "train.csv" in message
    assert "age (mean " in message and "chol (mean " in message and "bp (mean" not in message
    assert "set data.scale: site" in message


def test_scale_site_standardizes_with_the_training_rows_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _site_files(tmp_path / "clinic", scale=40.0, offset=120.0)
    raw = load_site(tmp_path / "clinic", n_classes=2)

    with caplog.at_level(logging.WARNING, logger="fl_components.task.builtin"):
        data = _site(tmp_path / "clinic", scale="site").load()

    np.testing.assert_allclose(data.train.features.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(data.train.features.std(axis=0), 1.0, atol=1e-5)
    mean, std = raw.train.features.mean(axis=0), raw.train.features.std(axis=0)
    np.testing.assert_allclose(data.test.features, (raw.test.features - mean) / std, rtol=1e-4)
    assert unscaled_columns(data.train) == [] and not caplog.records
    np.testing.assert_array_equal(data.test.labels, raw.test.labels)


def test_standardize_leaves_a_constant_column_centred() -> None:
    split = Split(np.array([[5.0, 1.0], [5.0, 3.0]], np.float32), np.array([0, 1]))
    scaled = standardize_site(SiteData("s", split, split))

    np.testing.assert_allclose(scaled.train.features, [[0.0, -1.0], [0.0, 1.0]])


def test_unscaled_thresholds() -> None:
    features = np.stack(
        [
            np.linspace(0, 1, 50),
            np.linspace(0, 100, 50),
            np.full(50, 7.0),
            np.linspace(0, 1e-4, 50),
        ],
        axis=1,
    ).astype(np.float32)

    far = unscaled_columns(Split(features, np.zeros(50, np.int64), ("ok", "wide", "seven", "tiny")))

    assert [c.name for c in far] == ["wide", "seven", "tiny"]


def test_scale_site_needs_site_files() -> None:
    with pytest.raises(ConfigError) as error:
        config_from_dict({"data": {"scale": "site"}})

    assert "data.scale is 'site' but data.source is 'bundled'" in str(error.value)
