"""Privacy of the individual: the coordinator side never holds an unmasked update, and a
masked vector is statistically independent of its input (fresh masks every round)."""

from __future__ import annotations

import numpy as np
import pytest

from fl_components.secure_aggregation.protocol import (
    SecAggCoordinator,
    agreement,
    coordinator,
    messages,
    prg,
    quantize,
)
from fl_components.secure_aggregation.protocol import shamir as shamir_module
from fl_components.secure_aggregation.protocol.quantize import Quantizer

from .federation import Federation, random_updates


class RecordingNumpy:
    """Stands in for ``numpy`` inside a module and records a copy of every array it sees."""

    def __init__(self, log: list[np.ndarray]) -> None:
        self._log = log

    def __getattr__(self, name: str):
        attr = getattr(np, name)
        if not callable(attr) or isinstance(attr, type):
            return attr

        def recorded(*args, **kwargs):
            result = attr(*args, **kwargs)
            for value in (*args, *kwargs.values(), result):
                if isinstance(value, np.ndarray):
                    self._log.append(np.array(value, copy=True))
            return result

        return recorded


def _all_arrays(obj, seen=None):
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _all_arrays(v, seen)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _all_arrays(v, seen)
    elif hasattr(obj, "__dict__"):
        yield from _all_arrays(vars(obj), seen)


def test_coordinator_never_holds_an_unmasked_individual_update(monkeypatch):
    fed = Federation.make(6)
    d = 1000  # below one PRG chunk, so every recorded array is a whole vector
    ctx = fed.context(dimension=d, threshold=3)
    updates = random_updates(fed.sites, d, seed=11)
    dropped = {fed.sites[2]}

    quantized: dict[str, np.ndarray] = {}
    real_quantize = Quantizer.quantize

    def spy(self, update, *, rng):
        out = real_quantize(self, update, rng=rng)
        quantized[current[0]] = out.copy()
        return out

    current = [""]
    monkeypatch.setattr(Quantizer, "quantize", spy)
    wire = {}
    for site in fed.sites:
        if site not in dropped:
            current[0] = site
            wire[site] = fed.participants[site].mask_update(ctx, updates[site]).to_bytes()
    monkeypatch.undo()

    log: list[np.ndarray] = []
    recorder = RecordingNumpy(log)

    def as_coordinator(fn, *args):
        with pytest.MonkeyPatch.context() as patch:
            for module in (coordinator, prg, quantize, messages):
                patch.setattr(module, "np", recorder)
            return fn(*args)

    coord = SecAggCoordinator(ctx, fed.registry)
    for raw in wire.values():
        as_coordinator(coord.receive, raw)
    requests = as_coordinator(coord.unmask_requests)
    responses = [fed.participants[s].unmask_response(ctx, r) for s, r in requests.items()]
    result = as_coordinator(coord.finish, responses)
    log.extend(_all_arrays(coord))
    log.extend(_all_arrays(result))

    survivors = [s for s in fed.sites if s not in dropped]
    assert len(log) > 20 and len(quantized) == len(survivors)
    q = ctx.quantizer
    for array in (a for a in log if a.shape == (d,)):
        for site in survivors:
            if array.dtype == np.uint32:
                distance = np.abs(array.astype(np.int64) - quantized[site].astype(np.int64))
                assert distance.max() > 1, f"coordinator held {site}'s quantized update"
            else:
                clipped = np.clip(updates[site], -1, 1)
                assert np.abs(array - clipped).max() > q.error_bound(1), site
    for site in survivors:  # the received messages keep no vector
        assert coord._received[site].masked.size == 0


# -- statistical independence ---------------------------------------------------------
def uniformity_statistic(words: np.ndarray) -> float:
    """Chi-square statistic of the top byte over 256 bins (mean 255, sd ~22.6 if uniform)."""
    counts = np.bincount((words >> 24).astype(np.int64), minlength=256)
    expected = words.size / 256
    return float(((counts - expected) ** 2 / expected).sum())


CHI2_LIMIT = 400.0  # ~6.4 standard deviations above the mean for 255 degrees of freedom


def masks_look_fresh_and_independent(fed: Federation, d: int = 100_000) -> bool:
    """True when masked vectors are uniform, uncorrelated with the input, and not reused."""
    site = fed.sites[0]
    participant = fed.participants[site]
    x = np.random.default_rng(5).uniform(-1, 1, d)
    constant = np.full(d, 0.5)
    r1 = fed.context(dimension=d, round=1)
    r2 = fed.context(dimension=d, round=2)
    other_run = fed.context(dimension=d, round=1, run_id="run-2")
    m_const = participant.mask_update(r1, constant).masked
    m_x = participant.mask_update(r1, x).masked
    m_r2 = participant.mask_update(r2, constant).masked
    m_run = participant.mask_update(other_run, constant).masked
    correlation = abs(np.corrcoef(x, m_x.astype(np.float64))[0, 1])
    return (
        uniformity_statistic(m_const) < CHI2_LIMIT
        and correlation < 6 / np.sqrt(d)
        and uniformity_statistic(m_const - m_r2) < CHI2_LIMIT  # wraps mod 2^32
        and uniformity_statistic(m_const - m_run) < CHI2_LIMIT
    )


def test_masked_vector_is_independent_of_its_input():
    assert masks_look_fresh_and_independent(Federation.make(4))


def test_detector_fails_when_masks_are_zero(monkeypatch):
    monkeypatch.setattr(prg.MaskExpander, "apply", lambda self, acc, *, add=(), subtract=(): None)
    assert not masks_look_fresh_and_independent(Federation.make(4))


def test_detector_fails_when_masks_are_reused_across_rounds_and_runs(monkeypatch):
    fixed = shamir_module.random_secret()
    real_seed = agreement.pairwise_seed
    monkeypatch.setattr(shamir_module, "random_secret", lambda: fixed)
    monkeypatch.setattr(
        agreement,
        "pairwise_seed",
        lambda shared, *, run_id, round, u, v: real_seed(shared, run_id="x", round=0, u=u, v=v),
    )
    assert not masks_look_fresh_and_independent(Federation.make(4))
