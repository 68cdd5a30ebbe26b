"""Checks behind ``fedpipe budget``: is this a site folder, is this delta usable.

The figures themselves are the ledgers' (:mod:`fl_components.privacy.ledger`, Opacus RDP /
PRV accounting, Mironov 2017, arXiv:1702.07476); this module only says what is wrong with
an argument before any epsilon is printed.
"""

from __future__ import annotations

from pathlib import Path

from fl_components.data.site_files import SUPPORTED_SUFFIXES
from fl_components.errors import ConfigError
from fl_components.privacy.ledger import LEDGER_FILE

_SITE_CONTENTS = (
    f"a site folder holds its data (train and test as {', '.join(SUPPORTED_SUFFIXES)}) and, "
    f"once it has trained with DP, {LEDGER_FILE}"
)


def check_delta(delta: float) -> float:
    """``delta`` if it lies in (0, 1); epsilon is meaningless elsewhere.

    Raises
    ------
    ConfigError
        Naming the value and a usable one.
    """
    if not 0.0 < delta < 1.0:
        raise ConfigError(
            f"--delta {delta:g} is outside (0, 1): delta is a probability of failure; "
            "use e.g. 1e-5 (below 1 / number of records)"
        )
    return delta


def site_ledger_path(folder: Path) -> Path:
    """The ledger of the site in ``folder``.

    Raises
    ------
    ConfigError
        When ``folder`` does not exist, is a file, is not a site folder, or is a site that
        has not trained with DP yet; each message says which and what a site folder holds.
    """
    if not folder.exists():
        raise ConfigError(f"{folder} does not exist; {_SITE_CONTENTS}")
    if not folder.is_dir():
        raise ConfigError(f"{folder} is a file, not a site folder; {_SITE_CONTENTS}")
    path = folder / LEDGER_FILE
    if path.is_file():
        return path
    has_data = any((folder / f"train{s}").is_file() for s in SUPPORTED_SUFFIXES)
    if not has_data:
        raise ConfigError(f"{folder} is not a site folder (no train file); {_SITE_CONTENTS}")
    raise ConfigError(
        f"site folder {folder} has no {LEDGER_FILE}: this site has not trained with DP yet "
        "(privacy.mode record or both), so it has spent no budget"
    )
