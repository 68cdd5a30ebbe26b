"""What an in-process run shows on the console, and what goes only to its log file.

Expected failures (a site that declines its budget, a site with bad data, too few sites for a
round) are raised and logged several times on their way out: by the task that failed, by
Prefect's task and flow engines (with a traceback), and by the round that gave up. The
console shows each once: the CLI's paragraph for the run's error, and one line per site that
dropped out. Every record, tracebacks included, still goes to the run's log file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

# Prefect's engines log a failed task or flow run here (the reason, again, at ERROR)
_ENGINE_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


@dataclass
class SiteDropouts:
    """The dropout lines the backends logged, per site (``site -> messages``)."""

    messages: dict[str, list[str]] = field(default_factory=dict)

    def add(self, site: str, message: str) -> None:
        """Remember one dropout line of ``site``."""
        self.messages.setdefault(site, []).append(message)

    def lines(self) -> list[str]:
        """One line per site that dropped out (sorted by site): the first reason, how often."""
        out = []
        for _, messages in sorted(self.messages.items()):
            more = f" (and {len(messages) - 1} more time(s))" if len(messages) > 1 else ""
            out.append(f"{messages[0]}{more}")
        return out


class ConsoleQuieter(logging.Filter):
    """Keep tracebacks, engine repeats and per-site dropout lines off the console.

    A record a backend logs about one of ``sites`` (its first argument is the site's name)
    is collected into ``dropouts`` instead of printed; it stays in the log file.
    """

    def __init__(self, sites: tuple[str, ...], dropouts: SiteDropouts) -> None:
        super().__init__()
        self.sites = frozenset(sites)
        self.dropouts = dropouts

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a record the console should not show."""
        if record.exc_info or record.name == "py.warnings":
            return False
        if record.name.startswith(_ENGINE_LOGGERS) and record.levelno >= logging.ERROR:
            return False
        args = record.args if isinstance(record.args, tuple) else ()
        if record.name.startswith("tasks.") and args and args[0] in self.sites:
            self.dropouts.add(str(args[0]), record.getMessage())
            return False
        return True


@dataclass
class QuietRun:
    """What :func:`quiet_console` installed, to report from and to remove afterwards."""

    log_file: Path
    dropouts: SiteDropouts
    quieter: ConsoleQuieter
    file_handler: logging.Handler

    def close(self) -> None:
        """Remove the filter and the file handler."""
        root = logging.getLogger()
        root.removeHandler(self.file_handler)
        self.file_handler.close()
        for handler in root.handlers:
            handler.removeFilter(self.quieter)
        logging.captureWarnings(False)


def quiet_console(log_file: Path, *, sites: tuple[str, ...]) -> QuietRun:
    """Send every record to ``log_file``; filter the console handlers (see the module).

    Prefect's logging is set up first, so that its console handler is on the root logger
    to be filtered (set up later, it would find this file handler and leave the root alone).
    """
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    dropouts = SiteDropouts()
    quieter = ConsoleQuieter(sites, dropouts)
    root = logging.getLogger()
    for handler in root.handlers:
        handler.addFilter(quieter)
    file_handler = logging.FileHandler(log_file, encoding="utf-8")
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(name)s - %(message)s")
    )
    root.addHandler(file_handler)
    logging.captureWarnings(True)  # library warnings (Opacus' alpha range) to the file only
    return QuietRun(log_file, dropouts, quieter, file_handler)
