"""A run's privacy report: every figure, and how to recompute each one.

Every epsilon of *this run* (each site's DP-SGD rounds, the participant-level rounds of the
model's whole lineage) is recomputed from the JSON alone by the Opacus lines it carries. A
site's ``ledger_epsilon`` spans the site's earlier runs too, which the coordinator never
sees: it is the site's own figure, recomputed at the site by the command the report names
(``fedpipe budget <site folder> --delta <delta>``, from the site's ``privacy_ledger.json``).

Pure: explicit inputs in, a JSON-safe mapping and its markdown out (no MLflow, no Prefect).
Each epsilon is given under RDP (Mironov 2017, arXiv:1702.07476; the sampled Gaussian's RDP
of Mironov, Talwar & Zhang 2019, arXiv:1908.10530) and PRV (Gopi, Lee & Wutschitz 2021,
NeurIPS, arXiv:2106.02848), both from Opacus, over the rounds as listed: consecutive
rounds with the same (noise multiplier, sample rate) are merged into one accountant entry,
as the recompute snippet in the report does too. Participant-level rounds follow DP-FedAvg
(McMahan et al. 2018, arXiv:1710.06963); record-level rounds are DP-SGD at a site.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fl_components.privacy.ledger import RDP_ORDERS, epsilon_of

REPORT_VERSION = 1
PRIVACY_REPORT_JSON = "privacy/privacy_report.json"
PRIVACY_REPORT_MD = "privacy/privacy_report.md"
ACCOUNTANTS = ("rdp", "prv")

RECOMPUTE = '''import itertools, json
from opacus.accountants import PRVAccountant, RDPAccountant

report = json.load(open("privacy_report.json"))

def epsilon(rounds, delta, kind):
    """Compose the rounds (consecutive equal (z, q) merged) with Opacus's accountant."""
    acc = RDPAccountant() if kind == "rdp" else PRVAccountant()
    key = lambda r: (r["noise_multiplier"], r["sample_rate"])
    acc.history = [(*k, sum(r["steps"] for r in g)) for k, g in itertools.groupby(rounds, key)]
    if kind == "rdp":
        return acc.get_epsilon(delta, alphas=report["rdp_orders"])
    return acc.get_epsilon(delta)

for site in (s for s in report["sites"] if s["rounds"]):  # this run's DP-SGD rounds
    for kind in ("rdp", "prv"):
        print(site["site"], kind, epsilon(site["rounds"], site["delta"], kind))
client = report["client"]
if client:  # a site is at risk in sampled rounds (sites: null) and fixed rounds naming it
    named = sorted({s for r in client["rounds"] if r["sites"] for s in r["sites"]}) or [None]
    for kind in ("rdp", "prv"):
        print("client", kind, max(epsilon(
            [r for r in client["rounds"] if r["sites"] is None or s in r["sites"]],
            client["delta"], kind) for s in named))
'''


@dataclass(frozen=True)
class SiteRound:
    """One record-level round at a site (DP-SGD) or one participant-level round."""

    run: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    sites: tuple[str, ...] | None = None


@dataclass(frozen=True)
class SiteBudget:
    """What a site reported of its own ledger (all runs): the coordinator cannot replay it."""

    epsilon: float
    max_epsilon: float | None


def _merged(rounds: Sequence[SiteRound]) -> list[tuple[float, float, int]]:
    key = lambda r: (r.noise_multiplier, r.sample_rate)  # noqa: E731
    return [(*k, sum(r.steps for r in g)) for k, g in itertools.groupby(rounds, key)]


def _epsilons(rounds: Sequence[SiteRound], delta: float) -> dict[str, float]:
    history = _merged(rounds)
    return {kind: epsilon_of(history, delta=delta, accountant=kind) for kind in ACCOUNTANTS}


def _client_epsilons(rounds: Sequence[SiteRound], delta: float) -> dict[str, float]:
    named = sorted({s for r in rounds if r.sites for s in r.sites})
    if not named:
        return _epsilons(rounds, delta)
    per_site = [
        _epsilons([r for r in rounds if r.sites is None or s in r.sites], delta) for s in named
    ]
    return {kind: max(e[kind] for e in per_site) for kind in ACCOUNTANTS}


def _rows(rounds: Sequence[SiteRound]) -> list[dict[str, Any]]:
    return [
        {
            "run": r.run,
            "round": r.round,
            "noise_multiplier": r.noise_multiplier,
            "sample_rate": r.sample_rate,
            "steps": r.steps,
            "sites": None if r.sites is None else list(r.sites),
        }
        for r in rounds
    ]


def _remaining(budget: float | None, spent: float) -> float | None:
    return None if budget is None else max(0.0, budget - spent)


def _site_section(
    site: str,
    site_rounds: Mapping[str, Sequence[SiteRound]],
    site_deltas: Mapping[str, float],
    site_budgets: Mapping[str, SiteBudget],
    declines: Mapping[str, Sequence[str]],
) -> dict[str, Any]:
    """One site's record-level entry: this run's rounds and epsilon, and its own ledger."""
    rounds = list(site_rounds.get(site, ()))
    delta = site_deltas.get(site)
    budget = site_budgets.get(site)
    return {
        "site": site,
        "mechanism": "DP-SGD (Opacus, Poisson-sampled batches, Gaussian noise)",
        "delta": delta,
        "rounds": _rows(rounds),
        "epsilon_this_run": _epsilons(rounds, delta) if delta is not None else {},
        "ledger_epsilon": None if budget is None else budget.epsilon,
        # all the site's runs: only its own ledger holds them
        "ledger_epsilon_recompute": None
        if budget is None or delta is None
        else f"at the site: fedpipe budget <folder of {site}> --delta {delta!r}",
        "budget": None if budget is None else budget.max_epsilon,
        "remaining": None if budget is None else _remaining(budget.max_epsilon, budget.epsilon),
        "declines": list(declines.get(site, ())),
    }


def _client_section(
    client_rounds: Sequence[SiteRound],
    client_delta: float,
    client_sampling: str | None,
    max_client_epsilon: float | None,
    accountant: str,
) -> dict[str, Any]:
    """The participant-level (DP-FedAvg) entry over the model's whole lineage."""
    epsilon = _client_epsilons(client_rounds, client_delta)
    return {
        "mechanism": "DP-FedAvg (clip to S, Gaussian noise z*S on the sum)",
        "sampling": client_sampling,
        "delta": client_delta,
        "rounds": _rows(client_rounds),
        "lineage": list(dict.fromkeys(r.run for r in client_rounds)),
        "epsilon": epsilon,
        "budget": max_client_epsilon,
        "remaining": _remaining(max_client_epsilon, epsilon.get(accountant, epsilon["rdp"])),
    }


def build_privacy_report(
    *,
    federation: str,
    mlflow_run_id: str,
    flow_run_id: str | None,
    mode: str,
    accountant: str,
    site_rounds: Mapping[str, Sequence[SiteRound]],
    site_deltas: Mapping[str, float],
    site_budgets: Mapping[str, SiteBudget],
    client_rounds: Sequence[SiteRound] | None,
    client_delta: float | None,
    client_sampling: str | None,
    max_client_epsilon: float | None,
    declines: Mapping[str, Sequence[str]],
    refused: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's privacy report as a JSON-safe mapping (see :func:`report_markdown`).

    Parameters
    ----------
    site_rounds, site_deltas :
        Record-level: each site's DP-SGD rounds *of this run* and its delta.
    site_budgets :
        Each site's own report of its ledger (all runs, decliners included).
    client_rounds, client_delta, client_sampling, max_client_epsilon :
        Participant-level: every round of the model's lineage (earlier runs first), or
        None when participant-level DP is off.
    declines :
        ``{site: [reason, ...]}`` of budget refusals in this run.
    refused :
        The round the coordinator refused for ``max_client_epsilon`` (round, reason,
        client epsilon spent), which ended the run; None if none was.
    """
    sites = [
        _site_section(site, site_rounds, site_deltas, site_budgets, declines)
        for site in sorted(set(site_rounds) | set(site_budgets))
    ]
    client = None
    if client_rounds is not None and client_delta is not None:
        client = _client_section(
            client_rounds, client_delta, client_sampling, max_client_epsilon, accountant
        )
    site_max = [s["ledger_epsilon"] for s in sites if s["ledger_epsilon"] is not None]
    return {
        "version": REPORT_VERSION,
        "federation": federation,
        "mlflow_run_id": mlflow_run_id,
        "flow_run_id": flow_run_id,
        "mode": mode,
        "accountant": accountant,
        "rdp_orders": list(RDP_ORDERS),
        "sites": sites,
        "client": client,
        "federation_site_epsilon": max(site_max) if site_max else None,
        "refused": None if refused is None else dict(refused),
        "recompute": RECOMPUTE,
    }


def _figure(value: float | None) -> str:
    return "unlimited" if value is None else f"{value:.4f}"


def _site_lines(report: Mapping[str, Any]) -> list[str]:
    """The record-level table, one row a site, and the federation's maximum."""
    lines = [
        "## Record level (DP-SGD at each site)",
        "",
        "| site | delta | rounds | eps this run (RDP) | eps this run (PRV) | ledger eps "
        "| budget | remaining | declines |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["sites"]:
        run = s["epsilon_this_run"]
        lines.append(
            f"| {s['site']} | {s['delta']} | {len(s['rounds'])} | "
            f"{_figure(run.get('rdp'))} | {_figure(run.get('prv'))} | "
            f"{_figure(s['ledger_epsilon'])} | {_figure(s['budget'])} | "
            f"{_figure(s['remaining'])} | {len(s['declines'])} |"
        )
    return [
        *lines,
        "",
        f"Federation (max over every site's ledger): {_figure(report['federation_site_epsilon'])}",
        "",
    ]


def _client_lines(client: Mapping[str, Any]) -> list[str]:
    """The participant-level summary and its rounds' table."""
    eps = client["epsilon"]
    return [
        "## Participant level (DP-FedAvg)",
        "",
        f"Sampling `{client['sampling']}`, delta {client['delta']}, "
        f"{len(client['rounds'])} rounds over runs {', '.join(client['lineage'])}: "
        f"epsilon {eps['rdp']:.4f} (RDP), {eps['prv']:.4f} (PRV); budget "
        f"{_figure(client['budget'])}, remaining {_figure(client['remaining'])}.",
        "",
        "| run | round | z | q | steps |",
        "|---|---|---|---|---|",
        *(
            f"| {r['run']} | {r['round']} | {r['noise_multiplier']:g} | "
            f"{r['sample_rate']:g} | {r['steps']} |"
            for r in client["rounds"]
        ),
        "",
    ]


def report_markdown(report: Mapping[str, Any]) -> str:
    """The report as markdown: the tables, then the recompute snippet."""
    lines = [
        f"# Privacy report: {report['federation']}",
        "",
        f"MLflow run `{report['mlflow_run_id']}`, Prefect flow run `{report['flow_run_id']}`, "
        f"mode `{report['mode']}`, accountant `{report['accountant']}`.",
        "",
    ]
    if report["sites"]:
        lines += _site_lines(report)
    if report["client"]:
        lines += _client_lines(report["client"])
    refused = report.get("refused")
    if refused:
        lines += [
            "## Stopped by the participant-level budget",
            "",
            f"Round {refused['round']} was refused before any site was asked (nothing "
            f"spent for it); epsilon spent {_figure(refused['client_epsilon_spent'])}. "
            f"{refused['reason']}",
            "",
        ]
    lines += [
        "## Recompute every figure of this run from privacy_report.json",
        "",
        "A site's ledger epsilon also counts its earlier runs, which only the site's own "
        "ledger holds: recompute it at the site with `fedpipe budget <site folder> --delta "
        "<delta>` (the `ledger_epsilon_recompute` field of each site).",
        "",
        "```python",
    ]
    lines += [report["recompute"].rstrip(), "```", ""]
    return "\n".join(lines)


def report_json(report: Mapping[str, Any]) -> str:
    """The report serialized (what is logged as privacy_report.json)."""
    return json.dumps(report, indent=2)
