"""The task's check before a run (``fedpipe validate``): importable, builds, trainable.

Everything round 1 would discover about the task's code, found on the operator's machine
first: the module imports, ``build_model`` returns a module, and, with record-level DP on,
Opacus can compute its per-sample gradients (its ``ModuleValidator``'s own diagnosis).
"""

from __future__ import annotations

from fl_components.config import FederationConfig
from fl_components.errors import ConfigError
from fl_components.site.dpsgd import validate_model
from fl_components.task.loading import TaskIdentity, resolve_task, task_identity


def check_task(config: FederationConfig) -> TaskIdentity:
    """Import and build the config's task; refuse a model DP-SGD cannot train.

    Raises
    ------
    ConfigError
        Naming the task and the fix (an import that fails, a model Opacus rejects).
    """
    task = resolve_task(config)
    where = "model.kind" if config.task is None else f"task {config.task!r}"
    try:
        model = task.build_model(config.seed)
    except ConfigError:
        raise
    except Exception as error:  # the user's build_model failed: one paragraph, no trace
        raise ConfigError(
            f"{where}: build_model({config.seed}) raised {type(error).__name__}: {error}; fix "
            "the task's build_model, then `fedpipe validate` again"
        ) from None
    if config.privacy.record_level:
        validate_model(model, where=where)
    return task_identity(config)
