"""The strategy examples load, build their strategy, and make their sites."""

from pathlib import Path

import pytest

from fl_components.config import load_config
from fl_components.strategies import build_strategy

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FILES = sorted([*EXAMPLES.glob("bank-branches*.yaml"), *EXAMPLES.glob("factory-*.yaml")])


def test_there_are_bank_and_factory_examples() -> None:
    names = {p.name for p in FILES}
    assert {"bank-branches-credit.yaml", "factory-workshops.yaml"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_example_validates_and_builds_its_strategy(path: Path) -> None:
    config = load_config(path)
    rule = build_strategy(config.strategy, num_sites=len(config.sites), local_lr=config.training.lr)
    assert rule.name == config.strategy.name
