from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fl_components.config import FederationConfig
from fl_components.data.site_files import load_site, read_split, write_split
from fl_components.data.types import Split
from fl_components.errors import DataError
from fl_components.federation import materialize_sites, select_participants


def test_materialized_sites_are_disjoint_and_reproducible(tmp_path: Path) -> None:
    config = FederationConfig(name="fed", data={"sites_dir": str(tmp_path)})  # type: ignore[arg-type]

    folders = materialize_sites(config)
    first = [load_site(f) for f in folders]
    materialize_sites(config, overwrite=True)
    again = [load_site(f) for f in folders]

    assert len(folders) == 10
    rows = np.concatenate([np.concatenate([s.train.features, s.test.features]) for s in first])
    assert len(np.unique(rows, axis=0)) >= len(rows) - 5  # digits has a few duplicate images
    assert all(
        np.array_equal(a.train.labels, b.train.labels) for a, b in zip(first, again, strict=True)
    )
    assert all(len(s.test) >= 1 for s in first)


def test_csv_and_parquet_with_label_column(tmp_path: Path) -> None:
    frame = pd.DataFrame({"age": [50, 61, 47], "bp": [1.2, 0.8, 1.0], "diagnosis": [1, 0, 1]})
    frame.to_csv(tmp_path / "train.csv", index=False)
    frame.to_parquet(tmp_path / "test.parquet")

    site = load_site(tmp_path, label_column="diagnosis")

    assert site.train.features.shape == (3, 2)
    np.testing.assert_array_equal(site.test.labels, [1, 0, 1])


def test_missing_label_column_names_columns_and_fix(tmp_path: Path) -> None:
    pd.DataFrame({"age": [1, 2], "bp": [3, 4]}).to_csv(tmp_path / "train.csv", index=False)

    with pytest.raises(DataError) as error:
        read_split(tmp_path / "train.csv", label_column="label")

    message = str(error.value)
    assert (
        "no column 'label'" in message and "age, bp" in message and "data.label_column" in message
    )


def test_npz_without_arrays_and_nan(tmp_path: Path) -> None:
    np.savez(tmp_path / "train.npz", features=np.zeros((2, 2)))
    with pytest.raises(DataError, match="save features as 'x'"):
        read_split(tmp_path / "train.npz")

    write_split(tmp_path / "bad.npz", Split(np.array([[np.nan]], np.float32), np.array([0])))
    with pytest.raises(DataError, match="NaN"):
        read_split(tmp_path / "bad.npz")


def test_missing_site_folder_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="fedpipe partition"):
        load_site(tmp_path / "ghost")


def test_selection_is_seeded_and_respects_minimum() -> None:
    names = tuple(f"s{i}" for i in range(10))

    a = select_participants(names, fraction=0.3, minimum=2, round_num=1, seed=0)
    b = select_participants(names, fraction=0.3, minimum=2, round_num=1, seed=0)
    c = select_participants(names, fraction=0.1, minimum=4, round_num=2, seed=0)

    assert a == b and len(a) == 3
    assert len(c) == 4 and set(c) <= set(names)
