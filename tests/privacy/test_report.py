"""The privacy report: every epsilon recomputed from its JSON alone, with Opacus."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from fl_components.privacy.report import (
    SiteBudget,
    SiteRound,
    build_privacy_report,
    report_json,
    report_markdown,
)


def _report(*, client_sampling: str | None, record: bool) -> dict:
    site_rounds = {}
    if record:  # h2 dropped out of round 2; h3's q changed with its data
        site_rounds = {
            "h1": [SiteRound("r2", n, 1.1, 0.05, 40) for n in (1, 2, 3)],
            "h2": [SiteRound("r2", 1, 0.9, 0.1, 20), SiteRound("r2", 3, 0.9, 0.1, 20)],
            "h3": [SiteRound("r2", 1, 1.3, 0.02, 100), SiteRound("r2", 2, 1.3, 0.04, 50)],
        }
    client_rounds = None
    if client_sampling == "random":  # two runs of one lineage with different q
        client_rounds = [SiteRound("r1", n, 1.0, 0.3, 1) for n in (1, 2, 3)]
        client_rounds += [SiteRound("r2", n, 1.2, 0.5, 1) for n in (1, 2)]
    elif client_sampling == "fixed":  # cohorts of varying size: 3, 1, 2 sites
        cohorts = [("h1", "h2", "h3"), ("h2",), ("h1", "h2")]
        client_rounds = [SiteRound("r2", n, 1.0, 1.0, 1, c) for n, c in enumerate(cohorts, start=1)]
    return build_privacy_report(
        federation="hospitals",
        mlflow_run_id="r2",
        flow_run_id="flow-2",
        mode="both" if record and client_sampling else ("record" if record else "participant"),
        accountant="rdp",
        site_rounds=site_rounds,
        site_deltas={s: 1e-5 for s in site_rounds},
        site_budgets={"h1": SiteBudget(2.5, 3.0), "h4": SiteBudget(2.99, 3.0)} if record else {},
        client_rounds=client_rounds,
        client_delta=1e-3 if client_sampling else None,
        client_sampling=client_sampling,
        max_client_epsilon=20.0 if client_sampling else None,
        declines={"h4": ["round 1: site 'h4' declines: epsilon spent 2.990"]} if record else {},
    )


def _recomputed(report: dict, folder: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    (folder / "privacy_report.json").write_text(report_json(report))
    monkeypatch.chdir(folder)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(report["recompute"], {})  # the report's own lines, with Opacus, JSON alone
    return printed.getvalue().splitlines()


@pytest.mark.parametrize(
    ("client_sampling", "record"),
    [(None, True), ("random", False), ("fixed", False), ("random", True)],
)
def test_every_epsilon_is_recomputed_from_the_json_to_1e_9(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_sampling: str | None, record: bool
) -> None:
    report = json.loads(report_json(_report(client_sampling=client_sampling, record=record)))
    lines = _recomputed(report, tmp_path, monkeypatch)
    figures = {}
    for line in lines:
        who, kind, value = line.split()
        figures[(who, kind)] = float(value)
    expected = {}
    for site in report["sites"]:
        for kind, value in site["epsilon_this_run"].items():
            expected[(site["site"], kind)] = value
    if report["client"]:
        for kind, value in report["client"]["epsilon"].items():
            expected[("client", kind)] = value
    # h4 (declined, no rounds this run) prints 0.0 for its run; compare every figure
    assert set(expected) <= set(figures)
    for key, value in expected.items():
        assert figures[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert len(expected) >= 2


def test_report_lists_budgets_declines_and_the_lineage() -> None:
    report = _report(client_sampling="random", record=True)
    h4 = next(s for s in report["sites"] if s["site"] == "h4")
    assert h4["declines"] and h4["remaining"] == pytest.approx(0.01)
    assert report["federation_site_epsilon"] == pytest.approx(2.99)
    assert report["client"]["lineage"] == ["r1", "r2"]
    assert report["client"]["remaining"] == pytest.approx(20.0 - report["client"]["epsilon"]["rdp"])
    markdown = report_markdown(report)
    assert "## Participant level (DP-FedAvg)" in markdown and "| r1 | 3 | 1 | 0.3 | 1 |" in markdown
    assert "```python" in markdown and "PRVAccountant" in markdown
