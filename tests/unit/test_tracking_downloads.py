"""Loading the champion (or a run's model) leaves no download folder behind."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_components.config import FederationConfig
from fl_components.tracking import RunTracker, load_registered_parameters, load_run_model


def test_champion_and_run_model_loads_remove_their_download_folder(
    small_config: FederationConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    tracker = RunTracker(small_config)
    link = tracker.start(run_name="leak-check", tags={})
    version = tracker.log_model(model, input_example=np.zeros((2, 3), np.float32), register=True)
    assert version is not None
    tracker.set_alias("champion", version)
    tracker.end()
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(downloads))  # where mkdtemp puts folders

    champion = load_registered_parameters(
        small_config.tracking, name=small_config.name, alias="champion"
    )
    from_run = load_run_model(small_config.tracking, run_id=link.run_id)

    for loaded in (champion, from_run):
        weights = [t for t in loaded.state_dict().values()]
        assert torch.equal(weights[0], model[0].weight) and torch.equal(weights[1], model[0].bias)
    assert list(downloads.iterdir()) == []
