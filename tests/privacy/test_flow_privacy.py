from __future__ import annotations

import pytest
from opacus.accountants import RDPAccountant

from fl_components.privacy.ledger import RDP_ORDERS
from fl_components.round.types import Dropout, DropoutKind
from tasks.tracking import round_markdown


@pytest.mark.integration
def test_logged_epsilon_is_recomputed_from_logged_params(prefect_harness, small_config) -> None:
    from mlflow.tracking import MlflowClient

    from flows.federated_training import federated_training

    config = small_config.model_validate(
        {
            **small_config.model_dump(exclude_unset=True),
            "training": {"epochs": 1, "batch_size": 32},
            "tracking": {**small_config.tracking.model_dump(), "register_model": False},
            "privacy": {"mode": "record", "noise_multiplier": 1.1, "max_epsilon": 50},
        }
    )
    summary = federated_training(config)

    client = MlflowClient(tracking_uri=summary.tracking_uri)
    run = client.get_run(summary.mlflow_run_id)
    params, metrics = run.data.params, run.data.metrics
    site_epsilons = []
    for site in config.site_names:
        prefix = f"privacy.site.{site}"
        accountant = RDPAccountant()  # Opacus directly, from the logged params alone
        for _ in range(config.rounds * int(params[f"{prefix}.steps_per_round"])):
            accountant.step(
                noise_multiplier=float(params[f"{prefix}.noise_multiplier"]),
                sample_rate=float(params[f"{prefix}.sample_rate"]),
            )
        # the orders fedpipe minimises over (Opacus's defaults and more; see README)
        recomputed = accountant.get_epsilon(
            delta=float(params[f"{prefix}.delta"]), alphas=list(RDP_ORDERS)
        )
        assert metrics[f"privacy/site/{site}/epsilon"] == pytest.approx(recomputed, rel=1e-9)
        site_epsilons.append(recomputed)
    assert metrics["privacy/epsilon"] == pytest.approx(max(site_epsilons), rel=1e-9)
    assert params["privacy.accountant"] == "rdp"
    assert params[f"privacy.site.{config.site_names[0]}.grad_sample_mode"] == "ew"
    history = client.get_metric_history(summary.mlflow_run_id, "privacy/epsilon")
    assert [m.step for m in history] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(summary.mlflow_run_id, "plots")}
    assert {"plots/epsilon.png", "plots/accuracy_vs_epsilon.png"} <= artifacts
    # each site's ledger names the runs that spent its budget
    from fl_components.federation import site_folder
    from fl_components.privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger.open(site_folder(config, "site-0"), site="site-0", accountant="rdp")
    assert [e.mlflow_run_id for e in ledger.entries] == [summary.mlflow_run_id] * config.rounds
    assert {e.flow_run_id for e in ledger.entries} == {summary.prefect_flow_run_id}


def test_a_budget_refusal_shows_as_declined_in_the_round_table() -> None:
    from fl_components.round.types import Metrics

    reason = str(Dropout("h2", DropoutKind.DECLINED, "site 'h2' declines: epsilon spent 2.9"))
    markdown = round_markdown(
        federation="f",
        round_num=3,
        metrics={},
        site_metrics={s: Metrics(0.1, 0.9, 10) for s in ("h1", "h2")},
        examples={"h1": 100},
        dropouts={"h2": reason},
        extra_columns={"epsilon": {"h1": "1.2", "h2": "declined"}},
    )
    assert reason == "declined: site 'h2' declines: epsilon spent 2.9"
    assert "| h2 | declined: site 'h2' declines: epsilon spent 2.9 |" in markdown
    assert "dropped" not in markdown
