"""Run names from the config a run trains with: ``<federation>-<strategy>-<UTC start>``.

The start is ``YYYYmmdd-HHMMSS``. Prefect names the coordinator's flow run so; the MLflow
run takes the same name; each participant run adds its site, round, stage and the
coordinator run's short id. A name the user gave (the UI form's Run Name field,
``run_deployment(flow_run_name=...)``) is kept; only the random names Prefect makes up (its
server's ``adjective-animal``, its UI's ``greek-constellation``) are replaced.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

from prefect.runtime import flow_run

from fl_components.config import FederationConfig

# the Prefect UI pre-fills its Run Name field with <greek letter><digits>-<constellation>[-x]
_UI_RANDOM_NAME = re.compile(
    r"(alpha|beta|gamma|delta|epsilon|zeta|eta|theta|iota|kappa|lambda|mu|nu|xi|omicron|pi|"
    r"rho|sigma|tau|upsilon|phi|chi|psi|omega)\d*(-[a-z]+)+"
)


def run_name(federation: str, *, started: datetime, strategy: str | None = None) -> str:
    """``<federation>[-<strategy>]-<YYYYmmdd-HHMMSS>`` (UTC): readable, and one per start."""
    rule = f"-{strategy}" if strategy else ""
    return f"{federation}{rule}-{started.astimezone(UTC):%Y%m%d-%H%M%S}"


def config_run_name(config: FederationConfig, *, started: datetime | None = None) -> str:
    """The run name of ``config``: its federation and strategy, and the start time."""
    return run_name(
        config.name, strategy=config.strategy.name, started=started or datetime.now(UTC)
    )


@cache
def _coolname_words() -> frozenset[str]:
    """The words Prefect's server draws its random run names from (coolname's lists)."""
    import coolname

    words: set[str] = set()
    for listing in (Path(coolname.__file__).parent / "data").glob("*.txt"):
        for line in listing.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line and "=" not in line and not line.startswith(("[", "{")):
                words.update(re.split(r"[\s\-]+", line.lower()))
    return frozenset(words)


def is_random_name(name: str | None) -> bool:
    """True for a name Prefect made up (no name given), False for one a user chose."""
    if not name:
        return True
    if _UI_RANDOM_NAME.fullmatch(name):
        return True
    parts = name.split("-")
    return 2 <= len(parts) <= 4 and all(part in _coolname_words() for part in parts)


def given_run_name() -> str | None:
    """The flow run's name if a user gave it (the form's Run Name field), else None."""
    name = flow_run.get_name()
    return None if is_random_name(name) else str(name)


def coordinator_run_name() -> str:
    """Prefect's ``flow_run_name`` for the training flow: a given name, or from its config."""
    given = given_run_name()
    if given:
        return given
    config = flow_run.parameters.get("config")
    if isinstance(config, FederationConfig):
        return config_run_name(config)
    raw = dict(config or {})
    strategy = dict(raw.get("strategy") or {}).get("name") or "fedavg"
    name = str(raw.get("name") or "federation")
    return run_name(name, strategy=strategy, started=datetime.now(UTC))


def participant_run_name() -> str:
    """``<site>-r<round>-<stage>-<coordinator run's short id>``: tells runs of trainings apart.

    For the participant flow's ``flow_run_name`` (Prefect renames a run by it when it
    starts, so the name ``run_deployment`` gave is not enough).
    """
    job = flow_run.parameters.get("job")
    params = job.model_dump() if hasattr(job, "model_dump") else dict(job or {})
    params = dict(params.get("message") or params)  # the signed job's message (unverified:
    # a name only)
    short = str(params.get("run_id") or "")[:8]
    return f"{params.get('site')}-r{params.get('round')}-{params.get('stage')}-{short}"
