"""Prefect tasks that record a round and the run: MLflow metrics and Prefect artifacts."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from fl_components.round.types import Metrics
from fl_components.tracking import RunTracker


def artifact_key(federation: str, suffix: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9-]+", "-", federation.lower()).strip("-") or "federation"
    return f"{slug}-{suffix}"


def round_markdown(
    *,
    federation: str,
    round_num: int,
    metrics: dict[str, float],
    site_metrics: dict[str, Metrics],
    examples: dict[str, int],
    dropouts: dict[str, str],
    extra_columns: dict[str, dict[str, str]] | None = None,
) -> str:
    """A markdown summary of one round: global scores and a table of sites."""
    extra_columns = dict(extra_columns or {})
    for direction in ("up", "down"):  # exact bytes on the wire per site (framing included)
        prefix = f"bytes/{direction}/site/"
        per_site = {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}
        if per_site:
            extra_columns[f"bytes {direction}"] = {s: f"{int(v)}" for s, v in per_site.items()}
    lines = [
        f"# {federation}: round {round_num}",
        "",
        f"- global accuracy: **{metrics.get('global/accuracy', float('nan')):.4f}**, "
        f"loss {metrics.get('global/loss', float('nan')):.4f}",
        f"- participants: {int(metrics.get('participants', 0))}, "
        f"dropouts: {int(metrics.get('dropouts', 0))}, "
        f"seconds: {metrics.get('round_seconds', 0.0):.2f}",
        *(
            [f"- bytes up: {int(metrics['bytes/up'])}, down: {int(metrics['bytes/down'])}"]
            if "bytes/up" in metrics and "bytes/down" in metrics
            else []
        ),
        "",
    ]
    header = ["site", "trained on", "held-out examples", "loss", "accuracy", *extra_columns]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    # a site that dropped out and could not evaluate either still gets its row and reason
    for site in sorted(set(site_metrics) | set(dropouts)):
        trained = str(examples[site]) if site in examples else "—"
        if site in dropouts:
            reason = dropouts[site]
            trained = reason if reason.startswith("declined") else f"dropped: {reason}"
        score = site_metrics.get(site)
        scores = (
            f"{score.examples} | {score.loss:.4f} | {score.accuracy:.4f}"
            if score is not None
            else "— | — | —"
        )
        extras = [extra_columns[col].get(site, "") for col in extra_columns]
        lines.append(
            f"| {site} | {trained} | {scores} | " + " | ".join(extras) + (" |" if extras else "|")
        )
    return "\n".join(lines)


@task(name="log_round", task_run_name="log_round-r{round_num}", cache_policy=NO_CACHE, retries=2)
def log_round(
    tracker: RunTracker,
    metrics: dict[str, float],
    markdown: str,
    *,
    federation: str,
    round_num: int,
) -> None:
    """Log the round's metrics to MLflow at ``step = round`` and leave a Prefect artifact.

    Retried on I/O errors; a retry after the metrics went in (the artifact failed) does not
    log them a second time at the same step.
    """
    from prefect.runtime import task_run

    retried = int(task_run.run_count or 1) > 1
    if metrics and not (retried and tracker.logged_at(next(iter(metrics)), step=round_num)):
        tracker.log_metrics(metrics, step=round_num)
    create_markdown_artifact(
        markdown=markdown,
        key=artifact_key(federation, "round"),
        description=f"Round {round_num} of {federation}",
    )


def run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The flow run's logger (what the Prefect UI shows), or fedpipe's outside a run."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("fedpipe")


def accuracy_lines(metrics: Mapping[str, float]) -> list[str]:
    """The run's two accuracies, each named for what it was measured on.

    ``global/accuracy`` is the central test split's (embedded sites), or, with no central
    split, the federated one; ``sites/mean_accuracy`` is the federated evaluation: the
    example-weighted mean over the sites' held-out splits, what promotion compares.
    """
    federated = metrics.get("sites/mean_accuracy")
    central = metrics.get("global/accuracy")
    lines = []
    if central is not None and (federated is None or central != federated):
        lines.append(f"- accuracy on the central test split: **{central:.4f}**")
    if federated is not None:
        lines.append(
            f"- federated accuracy (the sites' held-out splits, weighted by examples; what "
            f"promotion compares): **{federated:.4f}**"
        )
    return lines


def summary_markdown(
    *,
    federation: str,
    strategy: str,
    rounds: int,
    final: Mapping[str, float],
    promotion: str | None,
    mlflow_run: str,
    model_version: str | None,
    difference: Sequence[str] | None,
) -> str:
    """The run's summary: its accuracies, the promotion and why, links, its config's changes.

    ``promotion``: "alias: reason" (None: no model registered); ``mlflow_run`` and
    ``model_version``: markdown (links where the MLflow server is known); ``difference``:
    the config's fields that differ from the deployment's (None: not a deployment run).
    """
    lines = [
        f"# {federation}: run summary",
        "",
        f"- strategy: {strategy}, rounds: {rounds}",
        *accuracy_lines(final),
        f"- final loss: {final.get('global/loss', float('nan')):.4f}",
        f"- MLflow run: {mlflow_run}",
        f"- model version: {model_version or 'none registered'}",
        f"- promotion: {promotion or 'none (no model registered)'}",
        "",
        "## Config, against the deployment's",
        "",
    ]
    if difference is None:
        lines.append("Not a deployment run: the config as given (see the MLflow run's params).")
    elif not difference:
        lines.append("The deployment's config, unchanged.")
    else:
        lines += [f"- {line}" for line in difference]
    return "\n".join(lines)


def publish_summary(federation: str, markdown: str) -> None:
    """The run's summary as a Prefect markdown artifact (key ``<federation>-summary``)."""
    create_markdown_artifact(
        markdown=markdown,
        key=artifact_key(federation, "summary"),
        description=f"Summary of a training run of {federation}",
    )
