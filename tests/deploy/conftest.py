"""One real stack for the session's deploy tests (see tests/deploy/stack_harness.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.deploy.stack_harness import SHARED, running_stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`fedpipe up` once (about 35 s); test_faults.py and test_stack.py share it, in order."""
    root = tmp_path_factory.mktemp("stack")
    with running_stack(root, name="e2e-fed", shared=SHARED) as record:
        yield record
