"""The CLI as a user runs it: `fedpipe run` in a fresh folder, `fedpipe validate` on a bad file.

`fedpipe run` starts its own temporary Prefect server (state under the working folder),
shows a row per round and where to look, and stops the server only once it has recorded
every task run: no traceback, no "Error flushing" from the server on the way out.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
# this checkout's CLI (an installed `fedpipe` script may belong to another checkout)
FEDPIPE = [sys.executable, "-m", "ops.cli.main"]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "FEDPIPE_"))
    }
    return {
        **env,
        "PREFECT_HOME": str(tmp_path / "state" / "prefect"),
        "COLUMNS": "120",
        "PYTHONPATH": str(REPO),
    }


def _fedpipe(tmp_path: Path, *args: str, timeout: float = 120) -> tuple[int, str]:
    done = subprocess.run(
        [*FEDPIPE, *args],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return done.returncode, done.stdout + done.stderr


@pytest.mark.slow
def test_run_shows_each_round_and_stops_prefect_cleanly(tmp_path: Path) -> None:
    config = {
        "name": "cli-fed",
        "rounds": 3,
        "sites": [{"name": f"site-{i}"} for i in range(3)],
        "data": {"dataset": "digits", "sites_dir": str(tmp_path / "sites")},
        "model": {"kind": "logreg"},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    (tmp_path / "federation.yaml").write_text(yaml.safe_dump(config))

    done = subprocess.run(
        [*FEDPIPE, "run", "federation.yaml"],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
        stdin=subprocess.DEVNULL,
    )
    output = done.stdout + done.stderr

    assert done.returncode == 0, output
    rows = [line.split() for line in done.stdout.splitlines() if line[:5].strip().isdigit()]
    assert [int(row[0]) for row in rows] == [1, 2, 3]
    assert "done: accuracy on the central test split" in done.stdout
    assert "federated accuracy (the sites' held-out splits)" in done.stdout
    assert "Promotion:    champion: no champion yet" in done.stdout
    assert "?workflowType=machine_learning" in done.stdout
    assert "Open the MLflow UI" in done.stdout
    assert "Traceback" not in output
    assert "Error flushing" not in output


def test_validate_names_the_bad_field(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"name": "x", "rounds": 0}))

    done = subprocess.run(
        [*FEDPIPE, "validate", "bad.yaml"],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 2
    assert "rounds" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def test_rounds_zero_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "fed.yaml").write_text(yaml.safe_dump({"name": "x", "rounds": 2}))

    rc, output = _fedpipe(tmp_path, "run", "fed.yaml", "--rounds", "0")

    assert rc == 2
    assert "fed.yaml with --rounds 0" in output and "rounds: Input should be greater" in output
    assert "Traceback" not in output and "pydantic" not in output


def test_demo_rounds_zero_is_one_clear_error(tmp_path: Path) -> None:
    rc, output = _fedpipe(tmp_path, "demo", "--rounds", "0")

    assert rc == 2
    assert "rounds: Input should be greater" in output and "Traceback" not in output


def test_a_directory_is_named_as_one(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "fed.yaml").write_text("name: x\n")

    rc, output = _fedpipe(tmp_path, "run", "configs")

    assert rc == 2
    assert "configs is a directory (it holds fed.yaml)" in output
    assert "does not exist" not in output and "Traceback" not in output


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_an_empty_config_is_refused_not_run_as_the_demo(tmp_path: Path, text: str) -> None:
    (tmp_path / "empty.yaml").write_text(text)

    for command in ("run", "validate"):
        rc, output = _fedpipe(tmp_path, command, "empty.yaml")

        assert rc == 2, output
        assert "empty.yaml is empty" in output and "fedpipe demo" in output
        assert "starting Prefect" not in output and "Traceback" not in output


@pytest.mark.slow
def test_every_site_declining_its_budget_is_one_paragraph(tmp_path: Path) -> None:
    config = {
        "name": "spent",
        "rounds": 2,
        "sites": [{"name": f"hospital-{i}"} for i in (1, 2, 3)],
        "participation": {"fraction": 1.0, "min_participants": 2},
        "data": {"dataset": "breast_cancer", "sites_dir": str(tmp_path / "sites")},
        "model": {"kind": "logreg"},
        # one round costs more than 0.01: every hospital declines round 1
        "privacy": {"mode": "record", "noise_multiplier": 0.8, "max_epsilon": 0.01},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    (tmp_path / "spent.yaml").write_text(yaml.safe_dump(config))

    rc, output = _fedpipe(tmp_path, "run", "spent.yaml", timeout=900)

    assert rc == 1, output
    assert output.count("run failed:") == 1
    for site in ("hospital-1", "hospital-2", "hospital-3"):
        assert output.count(f"site '{site}' declines") == 1, output
    assert "full log:" in output
    assert "Traceback" not in output and "Error flushing" not in output
    log = (tmp_path / "state" / "logs" / "spent.log").read_text()
    assert "Traceback" in log  # the full trace is kept, in the log file


@pytest.mark.slow
def test_a_site_with_bad_data_gets_one_line_and_a_nonzero_exit(tmp_path: Path) -> None:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    for site in ("a", "b", "c"):
        folder = tmp_path / "data" / site
        folder.mkdir(parents=True)
        for split, rows in (("train", 60), ("test", 20)):
            x = rng.normal(size=(rows, 4))
            frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(4)])
            frame["label"] = (x[:, 0] > 0).astype(int)
            if site == "c":
                frame["f1"] = "oops"  # a text column: site c cannot load its data
            frame.to_csv(folder / f"{split}.csv", index=False)
    config = {
        "name": "badfed",
        "rounds": 2,
        "sites": [{"name": f"site-{s}", "data_path": f"data/{s}"} for s in "abc"],
        "participation": {"fraction": 1.0, "min_participants": 2},
        "data": {
            "source": "site_files",
            "n_features": 4,
            "n_classes": 2,
            "allow_unloadable_sites": True,  # else the run stops before round 1
        },
        "model": {"kind": "logreg"},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))

    rc, output = _fedpipe(tmp_path, "run", "bad.yaml", timeout=900)

    assert rc == 3, output
    assert "1 site(s) dropped out:" in output
    lines = [line for line in output.splitlines() if "non-numeric feature column(s) ['f1']" in line]
    # once as the pre-run check's warning, once among the round's dropouts
    assert len(lines) == 2 and all("site-c" in line for line in lines), output
    assert lines[0].startswith("warning: site 'site-c'") and "bad_data" in lines[1], output
    assert "site-c gave nothing in any round" in output
    assert "Traceback" not in output and "Error flushing" not in output


@pytest.mark.slow
def test_a_site_with_bad_labels_stops_the_run_before_round_one_naming_the_file(
    tmp_path: Path,
) -> None:
    rows = "".join(f"{i * 0.1:.1f},{-i * 0.1:.1f},{i % 2}\n" for i in range(12))
    for site in ("a", "b"):
        folder = tmp_path / "data" / site
        folder.mkdir(parents=True)
        (folder / "test.csv").write_text("f0,f1,label\n" + rows)
        # site b's labels are scores, not classes: 0.5 must not be truncated to 0
        bad = rows.replace(",1\n", ",0.5\n", 2) if site == "b" else rows
        (folder / "train.csv").write_text("f0,f1,label\n" + bad)
    config = {
        "name": "badlabels",
        "rounds": 2,
        "sites": [{"name": f"site-{s}", "data_path": f"data/{s}"} for s in "ab"],
        "participation": {"fraction": 1.0, "min_participants": 2},
        "data": {"source": "site_files", "n_features": 2, "n_classes": 2},
        "model": {"kind": "logreg"},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))

    rc, output = _fedpipe(tmp_path, "run", "bad.yaml", timeout=900)

    assert rc == 2, output
    assert output.count("run not started:") == 1 and "Prefect" not in output, output
    train = "data/b/train.csv"
    named = [line for line in output.splitlines() if train in line]
    assert len(named) == 1, output
    assert "site-b" in named[0] and "column 'label', has bad labels" in named[0]
    assert "2 non-integer label(s), values 0.5, 0.5, at lines 3, 5" in named[0]
    assert "Traceback" not in output and "Error flushing" not in output


def test_doctor_without_a_stack_says_how_to_start_one(tmp_path: Path) -> None:
    """No stack recorded and no PREFECT_API_URL: exit 1, the fix, no traceback."""
    code, output = _fedpipe(tmp_path, "doctor", "--state-dir", str(tmp_path / "none"))

    assert code == 1, output
    assert "no stack is recorded under" in output
    assert "1 problem(s): deployment: fedpipe up" in output
    assert "Traceback" not in output


def test_promote_anyway_overrides_every_promotion_guard_rail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ops.cli import data, run

    (tmp_path / "fed.yaml").write_text(
        yaml.safe_dump({"name": "x", "rounds": 2, "promotion": {"max_loss_growth": 5}})
    )
    trained = []
    monkeypatch.setattr(data, "checked_before_run", lambda config: config)
    monkeypatch.setattr(run, "train_and_report", lambda config, resume: trained.append(config))

    run.run(tmp_path / "fed.yaml", rounds=None, resume=None, promote_anyway=True)

    (config,) = trained
    assert config.promotion.allowed == {"diverged", "below_baseline", "partial"}
    assert config.promotion.max_loss_growth == 5 and config.rounds == 2


def test_the_printed_mlflow_ui_port_is_one_that_is_free() -> None:
    import socket

    from ops.cli.report import _free_port

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]

        port = _free_port(taken)

    assert port != taken and port > 0
