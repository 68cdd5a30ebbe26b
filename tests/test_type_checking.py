"""`make lint`'s mypy: fl_components held to every per-module flag of `mypy --strict`.

mypy's `strict = true` is global-only (in an override section it turns strict mode on for
every module), so pyproject.toml spells the flags out; this test catches a flag left out,
or one a later mypy adds to `--strict`.
"""

from pathlib import Path

from mypy.main import process_options
from mypy.options import PER_MODULE_OPTIONS, Options

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "pyproject.toml")


def _options(*flags: str) -> Options:
    _, options = process_options([*flags, "fl_components"])
    return options


def test_fl_components_gets_every_per_module_flag_of_strict() -> None:
    strict, default = _options("--strict", "--config-file", ""), _options("--config-file", "")
    strict_flags = {f for f in PER_MODULE_OPTIONS if getattr(strict, f) != getattr(default, f)}
    assert "disallow_untyped_defs" in strict_flags  # the comparison sees strict mode at all
    ours = _options("--config-file", CONFIG)
    for module in ("fl_components", "fl_components.round.engine", "fl_components.wire.site_job"):
        checked = ours.clone_for_module(module)
        missing = {f for f in strict_flags if getattr(checked, f) != getattr(strict, f)}
        assert not missing, f"{module}: [tool.mypy] override lacks {sorted(missing)}"
    # the global-only flags of --strict that matter here
    assert ours.warn_redundant_casts and ours.warn_unused_configs


def test_mypy_checks_all_four_packages_in_python_3_11_and_strict_stays_in_fl_components() -> None:
    ours = _options("--config-file", CONFIG)
    assert sorted(ours.files or []) == ["fl_components", "flows", "ops", "tasks"]
    assert ours.python_version == (3, 11)
    assert not ours.ignore_missing_imports  # only named untyped packages are let through
    assert not ours.clone_for_module("ops.doctor").disallow_untyped_defs
