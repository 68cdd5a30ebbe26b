"""The task interface in-process: a user's package outside the repository, every local hook.

The package is written under ``tmp_path`` and imported from there, as a site that installed
it would; the site (:class:`fl_components.federation.Site`) trains it under FedProx's
proximal term, SCAFFOLD's correction and Opacus's DP-SGD, and the built-in models go
through the same interface.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from fl_components.config import FederationConfig
from fl_components.errors import ConfigError
from fl_components.federation import Site, dataset_info, materialize_sites, site_folder
from fl_components.parameters import get_parameters
from fl_components.privacy.ledger import PrivacyLedger
from fl_components.round.types import SiteInstructions
from fl_components.site.models import build_model
from fl_components.task.check import check_task
from fl_components.task.loading import import_task, resolve_task, task_identity
from tests.task.user_package import write_package, write_site

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = write_package(tmp_path / "user")
    monkeypatch.syspath_prepend(str(root))
    yield root
    for name in [m for m in sys.modules if m == "clinic_fl" or m.startswith("clinic_fl.")]:
        del sys.modules[name]


def _config(tmp_path: Path, **sections: Any) -> FederationConfig:
    sites = []
    for i in range(3):
        folder = tmp_path / "sites" / f"clinic-{i}"
        write_site(folder, seed=i)
        sites.append({"name": f"clinic-{i}", "data_path": str(folder)})
    return FederationConfig.model_validate(
        {
            "name": "clinic",
            "rounds": 2,
            "sites": sites,
            "task": "clinic_fl.fl:task",
            "training": {"epochs": 1, "batch_size": 16},
            **sections,
        }
    )


def _site(config: FederationConfig, name: str = "clinic-0") -> Site:
    return Site(
        name=name, folder=site_folder(config, name), config=config, info=dataset_info(config)
    )


CASES: dict[str, tuple[dict[str, Any], SiteInstructions]] = {
    "fedavg": ({}, SiteInstructions()),
    "fedprox": ({"strategy": {"name": "fedprox", "proximal_mu": 0.5}}, SiteInstructions()),
    "scaffold": ({"strategy": {"name": "scaffold"}}, SiteInstructions()),
    "qfedavg": (
        {"strategy": {"name": "qfedavg", "q": 1.0}},
        SiteInstructions(report_initial_loss=True),
    ),
    "dp-sgd": (
        {"privacy": {"mode": "record", "noise_multiplier": 1.0, "max_grad_norm": 1.0}},
        SiteInstructions(),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_users_task_trains_at_a_site_under_every_local_hook(
    tmp_path: Path, user_package: Path, case: str
) -> None:
    sections, instructions = CASES[case]
    config = _config(tmp_path, **sections)
    site = _site(config)
    model = site.task.build_model(config.seed)
    start = get_parameters(model)
    if case == "fedprox":
        instructions = SiteInstructions(proximal_mu=0.5)
    if case == "scaffold":
        zeros = [np.zeros_like(a) for a in start]
        instructions = SiteInstructions(server_control=zeros)

    update = site.train(start, round_num=1, seed=3, instructions=instructions)

    assert update.num_examples == 64  # 80 windows, 80 % to train
    assert [d.shape for d in update.delta] == [a.shape for a in start]
    assert any(float(np.abs(d).max()) > 0 for d in update.delta)
    assert np.isfinite(update.train_loss)
    if case == "qfedavg":  # F_k(θ_t): the task's own loss of the global model
        assert update.initial_loss is not None and np.isfinite(update.initial_loss)
    if case == "scaffold":
        assert update.control_delta is not None
        assert (site.folder / "scaffold_control.npz").is_file()
    if case == "dp-sgd":
        (entry,) = PrivacyLedger.open(site.folder, site="clinic-0", accountant="rdp").entries
        assert entry.task == "clinic_fl.fl:task"
        assert entry.task_sha256 == task_identity(config).sha256
    metrics = site.evaluate([a + d for a, d in zip(start, update.delta, strict=True)])
    assert metrics.examples == 16 and 0.0 <= metrics.accuracy <= 1.0


def test_the_proximal_term_pulls_the_users_model_back(tmp_path: Path, user_package: Path) -> None:
    config = _config(tmp_path, training={"epochs": 3, "batch_size": 16, "lr": 0.1})
    site = _site(config)
    start = get_parameters(site.task.build_model(config.seed))
    free = site.train(start, round_num=1, seed=3)
    held = site.train(start, round_num=1, seed=3, instructions=SiteInstructions(proximal_mu=5.0))
    norm = lambda delta: float(sum(np.sum(d**2) for d in delta))  # noqa: E731
    assert norm(held.delta) < norm(free.delta)


def test_the_same_seed_builds_the_same_model_and_another_another(
    tmp_path: Path, user_package: Path
) -> None:
    task = resolve_task(_config(tmp_path))
    a, b, c = (get_parameters(task.build_model(s)) for s in (7, 7, 8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_the_built_in_models_are_tasks_of_the_same_interface(tmp_path: Path) -> None:
    config = FederationConfig.model_validate(
        {
            "name": "digits",
            "sites": [{"name": f"s{i}"} for i in range(2)],
            "data": {"dataset": "digits", "sites_dir": str(tmp_path / "sites")},
            "model": {"kind": "cnn"},
            "training": {"epochs": 1},
        }
    )
    materialize_sites(config)
    task = resolve_task(config)
    assert task.spec == "builtin:cnn"
    via_task = get_parameters(task.build_model(4))
    direct = get_parameters(build_model(config.model, dataset_info(config), seed=4))
    assert all(np.array_equal(x, y) for x, y in zip(via_task, direct, strict=True))
    data = _site(config, "s0").load_task_data()
    features, label = data.train[0]
    assert features.shape == (64,) and label.dtype == torch.int64


def test_a_task_that_cannot_be_imported_names_the_module_and_the_fix() -> None:
    with pytest.raises(ConfigError) as caught:
        import_task("no_such_clinic.fl:task")
    message = str(caught.value)
    assert "'no_such_clinic.fl'" in message and "pip install" in message
    assert "PYTHONPATH" in message


def test_a_missing_attribute_is_named(tmp_path: Path, user_package: Path) -> None:
    with pytest.raises(ConfigError, match="has no attribute 'nope'"):
        import_task("clinic_fl.fl:nope")


def test_a_task_file_path_is_not_a_task(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="task"):
        FederationConfig.model_validate({"task": "/tmp/evil.py:task"})


def test_the_identity_changes_with_the_source(tmp_path: Path, user_package: Path) -> None:
    from fl_components.task import loading

    config = _config(tmp_path)
    first = task_identity(config)
    assert first.package == "clinic_fl" and len(first.sha256) == 64
    (user_package / "clinic_fl" / "fl.py").write_text(
        (user_package / "clinic_fl" / "fl.py").read_text() + "\n# changed\n"
    )
    loading._IDENTITIES.clear()
    assert task_identity(config).sha256 != first.sha256
    loading._IDENTITIES.clear()


def test_check_refuses_a_batchnorm_model_under_dp(tmp_path: Path) -> None:
    root = write_package(tmp_path / "bn", norm="batch")
    sys.path.insert(0, str(root))
    try:
        config = _config(tmp_path, privacy={"mode": "record", "noise_multiplier": 1.0})
        with pytest.raises(ConfigError) as caught:
            check_task(config)
        message = str(caught.value)
        assert "task 'clinic_fl.fl:task'" in message and "BatchNorm" in message
        assert "ModuleValidator.fix" in message and "GroupNorm" in message
        check_task(_config(tmp_path))  # without DP the model is fine
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m.startswith("clinic_fl")]:
            del sys.modules[name]


def test_fedpipe_validate_refuses_a_batchnorm_model_under_dp_in_one_paragraph(
    tmp_path: Path,
) -> None:
    write_package(tmp_path / "bn", norm="batch")
    config = _config(tmp_path, privacy={"mode": "record", "noise_multiplier": 1.0})
    (tmp_path / "fed.yaml").write_text(
        yaml.safe_dump(config.model_dump(mode="json", exclude_unset=True))
    )
    done = subprocess.run(
        [sys.executable, "-m", "ops.cli.main", "validate", "fed.yaml"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO}:{tmp_path / 'bn'}", "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "Traceback" not in output
    flat = " ".join(output.split())
    assert "BatchNorm" in flat and "ModuleValidator.fix" in flat and "GroupNorm" in flat


class _CustomSteps:
    """A task with its own train step (mixup-free, a penalty on the logits) and evaluation."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.steps = 0
        self.evaluations = 0

    def build_model(self, seed: int) -> torch.nn.Module:
        return self.inner.build_model(seed)

    def load_data(self, site: Any) -> Any:
        return self.inner.load_data(site)

    def train_step(self, model: torch.nn.Module, batch: Any, loss_fn: Any) -> torch.Tensor:
        self.steps += 1
        inputs, targets = batch
        outputs = model(inputs)
        return loss_fn(outputs, targets) + 1e-3 * (outputs**2).mean()

    def evaluate(
        self, model: torch.nn.Module, dataset: Any, device: torch.device
    ) -> dict[str, float]:
        self.evaluations += 1
        return {"loss": 0.5, "accuracy": 0.25}


@pytest.mark.parametrize("private", [False, True], ids=["plain", "dp-sgd"])
def test_a_custom_train_step_and_evaluation_are_the_ones_run(
    tmp_path: Path, user_package: Path, monkeypatch: pytest.MonkeyPatch, private: bool
) -> None:
    fl = importlib.import_module("clinic_fl.fl")
    custom = _CustomSteps(fl.task)
    monkeypatch.setattr(fl, "task", custom)
    privacy = {"mode": "record", "noise_multiplier": 1.0} if private else {"mode": "off"}
    config = _config(tmp_path, privacy=privacy, strategy={"name": "fedprox", "proximal_mu": 0.1})
    site = _site(config)
    start = get_parameters(site.task.build_model(config.seed))

    update = site.train(start, round_num=1, seed=1, instructions=SiteInstructions(proximal_mu=0.1))

    assert custom.steps > 0 and any(float(np.abs(d).max()) > 0 for d in update.delta)
    metrics = site.evaluate(start)
    assert (metrics.loss, metrics.accuracy, custom.evaluations) == (0.5, 0.25, 1)
