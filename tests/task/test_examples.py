"""The example tasks (examples/tasks/fedpipe_examples) train at a small size, as users copy them.

Each test writes simulated site folders with the example's own ``make_site``, runs rounds
through the engine with every site's job as fedpipe runs it (:func:`simulate`, no Prefect),
and scores the result on each site's own test split. The image task also trains under
record-level DP: its ResNet uses GroupNorm, which Opacus accepts.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl_components.config import FederationConfig, load_config
from fl_components.federation import Site, dataset_info, site_folder
from fl_components.round.planning import simulate
from fl_components.task.check import check_task

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "tasks"


@pytest.fixture(autouse=True)
def on_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    yield


def _config(tmp_path: Path, example: str, **sections: Any) -> FederationConfig:
    shipped = load_config(EXAMPLES / f"{example}.yaml")
    raw = shipped.model_dump(mode="json", exclude_unset=True)
    raw["sites"] = [{"name": s.name, "data_path": str(tmp_path / s.name)} for s in shipped.sites]
    raw.update({"rounds": 2, "training": {"epochs": 1, "batch_size": 16, "lr": 0.05}})
    raw.update(sections)
    return FederationConfig.model_validate(raw)


def _scores(config: FederationConfig, parameters: list[np.ndarray]) -> dict[str, float]:
    info = dataset_info(config)
    return {
        name: Site(name, site_folder(config, name), config, info).evaluate(parameters).accuracy
        for name in config.site_names
    }


@pytest.mark.parametrize(
    ("example", "sizes", "sections"),
    [
        ("images", {"train": 24, "test": 9}, {}),
        (
            "images",
            {"train": 24, "test": 9},
            {"privacy": {"mode": "record", "noise_multiplier": 0.7}},
        ),
        ("sensors", {"windows": 80, "held_out": 20}, {}),
    ],
    ids=["images", "images-dp-sgd", "sensors"],
)
def test_an_example_task_trains_and_is_scored_per_site(
    tmp_path: Path, example: str, sizes: dict[str, int], sections: dict[str, Any]
) -> None:
    config = _config(tmp_path, example, **sections)
    module = importlib.import_module(f"fedpipe_examples.{example}")
    for index, name in enumerate(config.site_names):
        module.make_site(site_folder(config, name), seed=index, **sizes)
    check_task(config)  # what `fedpipe validate` checks: imports, builds, Opacus accepts it

    state, seconds = simulate(config)

    assert len(seconds) == 2
    scores = _scores(config, state.parameters)
    assert set(scores) == set(config.site_names)
    assert all(0.0 <= s <= 1.0 for s in scores.values())


def test_the_image_sites_are_png_files_on_disk(tmp_path: Path) -> None:
    from fedpipe_examples import images

    images.make_site(tmp_path, seed=0, train=6, test=3)
    pngs = sorted(tmp_path.rglob("*.png"))
    assert len(pngs) == 9 and {p.parent.parent.name for p in pngs} == {"train", "test"}
    data = images.task.load_data(type("S", (), {"folder": tmp_path, "name": "s"})())
    x, _ = data.train[0]
    assert tuple(x.shape) == (1, images.SIZE, images.SIZE)


def test_the_sensor_test_split_is_the_most_recent_windows(tmp_path: Path) -> None:
    from fedpipe_examples import sensors

    sensors.make_site(tmp_path, seed=1, windows=50, held_out=10)
    data = sensors.task.load_data(type("S", (), {"folder": tmp_path, "name": "s"})())
    assert len(data.train) == 40 and len(data.test) == 10  # type: ignore[arg-type]
    assert "fedpipe_examples" in sys.modules
