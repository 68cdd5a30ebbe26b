"""Round checkpoints: what a crashed coordinator needs to go on from its last round.

After each completed round the coordinator writes the server's state (``ServerState.
state_dict()``: global model, strategy and server-optimizer state, clip norm, accountant
history, RNG state), the round and the MLflow run id. Arrays go to a safetensors file and
everything else to JSON: nothing is pickled, so reading a checkpoint back runs no code.

Layout under the run's folder::

    round-0003/arrays.safetensors   the arrays of round 3's state
    round-0003/state.json           the rest, arrays named by reference
    started.json                    the rounds begun: per round, each attempt's privacy step
    latest.json                     {"round": 3}: replaced atomically once round-0003 is whole

A round's folder is written under a temporary name, flushed and renamed; ``latest.json``
follows it (write, flush, ``os.replace``), so a crash at any moment leaves the previous
checkpoint intact. A round that was begun but has no checkpoint is *unfinished*: its
outcome is unknown, and whoever resumes counts its privacy step as spent. A round begun
again (by a resumed run) is listed once per attempt: each is a run of the mechanism.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fl_components.errors import FedpipeError

_ARRAY = "$array"  # {"$array": "parameters.0"}: the array stored under that key
_LATEST = "latest.json"
_STARTED = "started.json"
_STARTED_VERSION = 2


class CheckpointError(FedpipeError):
    """A checkpoint is missing, damaged, or holds something that is not plain data."""


@dataclass(frozen=True)
class Checkpoint:
    """The state after a completed round.

    Attributes
    ----------
    round : int
        The last completed round.
    mlflow_run_id : str
        The run the rounds were logged to: a resumed run logs into it.
    state : dict[str, Any]
        ``ServerState.state_dict()`` after that round.
    extra : dict[str, Any]
        Anything else the coordinator keeps (plain JSON and arrays), e.g. the flow run id.
    unfinished : dict[int, list[Any]]
        Rounds begun after ``round`` with no checkpoint, each with the privacy steps it was
        begun with, one per attempt (None without DP): their outcome is unknown.
    """

    round: int
    mlflow_run_id: str
    state: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    unfinished: dict[int, list[Any]] = field(default_factory=dict)


def split_arrays(tree: Any, *, path: str = "") -> tuple[Any, dict[str, npt.NDArray[Any]]]:
    """``tree`` with each numpy array replaced by a reference, and the arrays by key.

    Raises
    ------
    CheckpointError
        If the tree holds anything but dicts (str keys), lists, tuples, arrays, numpy
        scalars, str, int, float, bool and None.
    """
    arrays: dict[str, npt.NDArray[Any]] = {}
    if isinstance(tree, np.ndarray):
        arrays[path] = np.ascontiguousarray(tree)
        return {_ARRAY: path}, arrays
    if isinstance(tree, Mapping):
        out = {}
        for key, value in tree.items():
            if not isinstance(key, str) or key == _ARRAY:
                raise CheckpointError(f"checkpoint key {key!r} at {path or 'top'}: not a name")
            out[key], found = split_arrays(value, path=f"{path}.{key}" if path else key)
            arrays.update(found)
        return out, arrays
    if isinstance(tree, list | tuple):
        items = []
        for index, value in enumerate(tree):
            item, found = split_arrays(value, path=f"{path}.{index}" if path else str(index))
            items.append(item)
            arrays.update(found)
        return items, arrays
    if isinstance(tree, np.generic):
        return tree.item(), arrays
    if tree is None or isinstance(tree, str | int | float | bool):
        return tree, arrays
    raise CheckpointError(
        f"checkpoint value at {path or 'top'} is a {type(tree).__name__}: only plain data "
        "and numpy arrays are stored (nothing is pickled); convert it in state_dict()"
    )


def join_arrays(tree: Any, arrays: Mapping[str, npt.NDArray[Any]]) -> Any:
    """Inverse of :func:`split_arrays`."""
    if isinstance(tree, dict):
        if set(tree) == {_ARRAY}:
            key = tree[_ARRAY]
            if key not in arrays:
                raise CheckpointError(f"checkpoint names array {key!r}, which it does not hold")
            return np.array(arrays[key], copy=True)
        return {key: join_arrays(value, arrays) for key, value in tree.items()}
    if isinstance(tree, list):
        return [join_arrays(value, arrays) for value in tree]
    return tree


def _write_json(path: Path, document: Any) -> None:
    """Write ``document`` to ``path`` atomically (a reader sees the old or the new file)."""
    staging = path.with_name(f".{path.name}.tmp")
    with staging.open("w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=1, allow_nan=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)


def round_folder(folder: Path, round_num: int) -> Path:
    """Where round ``round_num``'s checkpoint lives."""
    return folder / f"round-{round_num:04d}"


def mark_round_started(folder: Path, round_num: int, *, privacy_step: Any = None) -> None:
    """Record that round ``round_num`` began (before any site is sent anything).

    Each call is one attempt: a round begun again keeps the earlier attempts' steps.
    """
    folder.mkdir(parents=True, exist_ok=True)
    started = {str(r): steps for r, steps in started_rounds(folder).items()}
    started.setdefault(str(round_num), []).append(privacy_step)
    _write_json(folder / _STARTED, {"version": _STARTED_VERSION, "rounds": started})


def started_rounds(folder: Path) -> dict[int, list[Any]]:
    """Every round begun under ``folder``, with each attempt's privacy step, by round."""
    if not (folder / _STARTED).is_file():
        return {}
    started = _read_json(folder / _STARTED)
    if started.get("version") != _STARTED_VERSION:  # version 1: one step per round, the last
        return {int(r): [step] for r, step in sorted(started.items(), key=lambda i: int(i[0]))}
    rounds = started["rounds"]
    return {int(r): list(steps) for r, steps in sorted(rounds.items(), key=lambda i: int(i[0]))}


def save_checkpoint(folder: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` for its round, then point ``latest.json`` at it.

    Returns
    -------
    Path
        The round's checkpoint folder.
    """
    from safetensors.numpy import save_file

    document, arrays = split_arrays({"state": checkpoint.state, "extra": checkpoint.extra}, path="")
    target = round_folder(folder, checkpoint.round)
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(arrays, str(staging / "arrays.safetensors"))
    _write_json(
        staging / "state.json",
        {"round": checkpoint.round, "mlflow_run_id": checkpoint.mlflow_run_id, **document},
    )
    for name in ("arrays.safetensors", "state.json"):
        with (staging / name).open("rb") as handle:
            os.fsync(handle.fileno())
    shutil.rmtree(target, ignore_errors=True)  # a round written again (a retried run)
    os.replace(staging, target)
    _write_json(folder / _LATEST, {"round": checkpoint.round})
    return target


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable ({error}); remove it to start over") from None


def load_latest(folder: Path) -> Checkpoint | None:
    """The last completed round's checkpoint under ``folder``; None if there is none.

    Raises
    ------
    CheckpointError
        If ``latest.json`` names a round whose files are missing or damaged.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    started = started_rounds(folder)
    if not (folder / _LATEST).is_file():
        return None
    round_num = int(_read_json(folder / _LATEST)["round"])
    target = round_folder(folder, round_num)
    document = _read_json(target / "state.json")
    try:
        arrays = load_file(str(target / "arrays.safetensors"))
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"{target}: arrays unreadable ({error})") from None
    joined = join_arrays({"state": document["state"], "extra": document["extra"]}, arrays)
    unfinished = {r: steps for r, steps in started.items() if r > round_num}
    return Checkpoint(
        round=round_num,
        mlflow_run_id=str(document["mlflow_run_id"]),
        state=joined["state"],
        extra=joined["extra"],
        unfinished=dict(sorted(unfinished.items())),
    )
