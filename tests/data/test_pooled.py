"""`fedpipe partition --from`: one pooled file split into simulated sites that read by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from fl_components.config import FederationConfig
from fl_components.data.check import check_sites
from fl_components.data.pooled import split_pooled_file

runner = CliRunner()


def _pooled(path: Path, rows: int = 400) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(rows, 3)), columns=["age", "income", "debt"])
    frame["hospital"] = rng.choice(["North Clinic", "South", "East"], rows)
    frame["label"] = rng.choice(["no", "yes"], rows)
    frame.to_csv(path, index=False, sep=";", decimal=",")
    return frame


def _config(tmp_path: Path, **data: object) -> FederationConfig:
    return FederationConfig.model_validate(
        {
            "name": "sim",
            "sites": [
                {"name": n, "data_path": str(tmp_path / "sites" / n)}
                for n in ("east", "north", "south")
            ],
            "data": {
                "source": "site_files",
                "label_map": {"no": 0, "yes": 1},
                "drop": ["hospital"],
                "delimiter": ";",
                "decimal": ",",
                "n_features": 3,
                **data,
            },
        }
    )


def test_dirichlet_split_covers_the_pool_once_and_every_site_loads(tmp_path: Path) -> None:
    pooled = _pooled(tmp_path / "pooled.csv")
    config = _config(tmp_path, partitioner="dirichlet", alpha=0.3)

    sites = split_pooled_file(tmp_path / "pooled.csv", config)

    indices = np.concatenate([np.concatenate([s.train.index, s.test.index]) for s in sites])
    assert sorted(indices.tolist()) == list(range(len(pooled)))
    assert all(len(s.test) >= 1 and len(s.train) >= 1 for s in sites)


def test_by_column_gives_one_site_per_value_and_the_cli_writes_loadable_files(
    tmp_path: Path,
) -> None:
    from ops.cli.main import app

    pooled = _pooled(tmp_path / "pooled.csv")
    config = _config(tmp_path)
    (tmp_path / "sim.yaml").write_text(config.model_dump_json(exclude_unset=True))

    result = runner.invoke(
        app,
        [
            "partition",
            str(tmp_path / "sim.yaml"),
            "--from",
            str(tmp_path / "pooled.csv"),
            "--by",
            "hospital",
        ],
    )

    assert result.exit_code == 0, result.output
    assert "site north (hospital = North Clinic)" in result.output
    check = check_sites(config)
    assert check.ok, check.problems
    north = next(row for row in check.sites if row.site == "north")
    assert north.train_rows + north.test_rows == (pooled["hospital"] == "North Clinic").sum()


def test_partition_of_site_files_without_a_pooled_file_says_what_to_give(tmp_path: Path) -> None:
    from ops.cli.main import app

    (tmp_path / "sim.yaml").write_text(_config(tmp_path).model_dump_json(exclude_unset=True))

    result = runner.invoke(app, ["partition", str(tmp_path / "sim.yaml")])

    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "sites bring their own files" in text and "--from FILE" in text


def test_existing_site_files_are_not_overwritten_without_asking(tmp_path: Path) -> None:
    from ops.cli.main import app

    _pooled(tmp_path / "pooled.csv")
    (tmp_path / "sim.yaml").write_text(_config(tmp_path).model_dump_json(exclude_unset=True))
    args = ["partition", str(tmp_path / "sim.yaml"), "--from", str(tmp_path / "pooled.csv")]

    first, second = runner.invoke(app, args), runner.invoke(app, args)

    assert first.exit_code == 0, first.output
    assert second.exit_code == 2 and "--overwrite" in " ".join(second.output.split())
