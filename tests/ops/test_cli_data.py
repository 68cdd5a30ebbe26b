"""``fedpipe site check`` at a site: its own folder against the federation's contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from fl_components.config import FederationConfig
from ops.cli.main import app

runner = CliRunner()


def _site(folder: Path, columns: list[str]) -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(40, len(columns))), columns=columns)
    frame["label"] = (frame[columns[0]] > 0).astype(int)
    folder.mkdir(parents=True)
    frame.to_csv(folder / "train.csv", index=False)
    frame.iloc[:10].to_csv(folder / "test.csv", index=False)


def _yaml(tmp_path: Path) -> Path:
    config = FederationConfig.model_validate(
        {
            "name": "branches",
            "backend": "work-pool",  # the coordinator's paths are not this site's
            "sites": [
                {"name": s, "data_path": f"/srv/{s}", "work_pool": f"{s}-pool"}
                for s in ("north", "south", "east")
            ],
            "data": {"source": "site_files", "columns": ["age", "income"], "n_classes": 2},
        }
    )
    path = tmp_path / "federation.yaml"
    path.write_text(config.model_dump_json(exclude_unset=True))
    return path


def test_a_site_checks_its_own_folder_before_any_job(tmp_path: Path) -> None:
    _site(tmp_path / "mine", ["income", "age"])  # another order: read by name

    result = runner.invoke(
        app,
        [
            "site",
            "check",
            str(_yaml(tmp_path)),
            "--site",
            "north",
            "--data",
            str(tmp_path / "mine"),
        ],
        terminal_width=200,
    )

    assert result.exit_code == 0, result.output
    assert "40 / 10" in result.output and "matches the contract" in result.output


def test_a_site_check_names_the_missing_column_and_exits_2(tmp_path: Path) -> None:
    _site(tmp_path / "mine", ["income", "years"])

    result = runner.invoke(
        app,
        [
            "site",
            "check",
            str(_yaml(tmp_path)),
            "--site",
            "north",
            "--data",
            str(tmp_path / "mine"),
        ],
        terminal_width=200,
    )

    assert result.exit_code == 2 and "lacks column(s) ['age']" in result.output
    assert "Traceback" not in result.output


def test_a_site_check_without_its_folder_says_to_give_it(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["site", "check", str(_yaml(tmp_path)), "--site", "north"], terminal_width=200
    )

    assert result.exit_code == 2 and "does not exist on this host" in result.output
    assert "--data PATH" in result.output
