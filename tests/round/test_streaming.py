"""Streaming aggregation: the mean folded as updates arrive, and robust rules' memory bound."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest

from fl_components.errors import ConfigError, RoundError
from fl_components.round.engine import RoundPlan, run_round
from fl_components.round.types import Dropout, DropoutKind, LocalUpdate, SiteJob, SiteResult
from fl_components.strategies import FedAvg, FedAvgM, Scaffold, UpdateAggregation
from fl_components.strategies.aggregation import MeanFold, bound_norm
from fl_components.strategies.robust import weighted_mean
from tasks.sites import stream_answers

SHAPES = [(64, 33), (33,), (7, 5, 3)]
SITES = tuple(f"s{i}" for i in range(8))


def _model() -> list[np.ndarray]:
    return [np.zeros(shape, dtype=np.float32) for shape in SHAPES]


def _delta(seed: int, scale: float = 1.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape) * scale).astype(np.float32) for shape in SHAPES]


def _update(site: str, seed: int, n: int, scale: float = 1.0) -> LocalUpdate:
    return LocalUpdate(site, 1, _delta(seed, scale), num_examples=n, train_loss=0.1, seconds=0.0)


def _plan(**extra: Any) -> RoundPlan:
    return RoundPlan(round=1, selected=SITES, seeds=dict.fromkeys(SITES, 0), **extra)


def _batch_mean(updates: Sequence[LocalUpdate]) -> np.ndarray:
    """The mean as fedpipe computed it before streaming: one (n, d) float64 matrix."""
    vectors = [np.concatenate([a.ravel() for a in u.delta]) for u in updates]
    return weighted_mean(vectors, [float(u.num_examples) for u in updates])


class Arrivals:
    """A streaming dispatch: makes each site's update only when the engine asks for the next.

    It counts how many update arrays are alive at once (weak references), which is what the
    coordinator holds: with streaming, the one just handed over and the one being made.
    """

    def __init__(self, weights: dict[str, int], *, scale: float = 1.0) -> None:
        self.weights = weights
        self.scale = scale
        self.alive = 0
        self.peak = 0
        self.lock = threading.Lock()
        self.made: list[LocalUpdate] = []  # copies, for the batch comparison

    def _gone(self) -> None:
        with self.lock:
            self.alive -= 1

    def stream(self, jobs: Sequence[SiteJob]) -> Iterator[tuple[str, SiteResult | Dropout]]:
        for index, job in enumerate(jobs):
            update = _update(job.site, index, self.weights[job.site], self.scale)
            self.made.append(
                LocalUpdate(
                    job.site,
                    1,
                    [a.copy() for a in update.delta],
                    num_examples=update.num_examples,
                    train_loss=0.1,
                    seconds=0.0,
                )
            )
            with self.lock:
                self.alive += 1
                self.peak = max(self.peak, self.alive)
            weakref.finalize(update.delta[0], self._gone)
            yield job.site, SiteResult(job.site, update=update)
            del update

    def __call__(self, jobs: Sequence[SiteJob]) -> dict[str, SiteResult | Dropout]:
        return dict(self.stream(jobs))


WEIGHTS = {site: 10 + 7 * i for i, site in enumerate(SITES)}


def test_the_streamed_mean_equals_the_batch_mean() -> None:
    updates = [_update(site, i, WEIGHTS[site]) for i, site in enumerate(SITES)]
    fold = MeanFold(_model())
    for update in updates:
        fold.add(update)
    mean = fold.result()
    streamed = np.concatenate([a.ravel() for a in mean])
    np.testing.assert_allclose(streamed, _batch_mean(updates), rtol=1e-6, atol=1e-7)
    assert [a.shape for a in mean] == SHAPES
    assert fold.participants == len(SITES)
    with pytest.raises(RoundError, match="already taken"):  # the sum was released
        fold.result()


def test_the_engine_streams_the_mean_and_holds_a_bounded_number_of_updates() -> None:
    strategy = FedAvg()
    state = strategy.initial_state(_model())
    dispatch = Arrivals(WEIGHTS)
    after, report = run_round(state, _plan(), dispatch, strategy)
    got = np.concatenate([p.ravel() for p in after.parameters])
    np.testing.assert_allclose(got, _batch_mean(dispatch.made), rtol=1e-6, atol=1e-7)
    # the batch path over the very same updates gives the same bits (one fold, same order)
    batch = strategy.aggregate(dispatch.made, state)
    np.testing.assert_array_equal(got, np.concatenate([d.ravel() for d in batch.delta]))
    # never more than the update being folded and the next one being made, out of 8
    assert dispatch.peak <= 2, dispatch.peak
    assert report.metrics["aggregation/peak_updates_held"] == 1.0
    assert report.metrics["participants"] == len(SITES)
    assert all(u.delta == [] for u in report.updates)  # metadata only, as under secagg
    assert report.metrics["bytes/up"] == len(SITES) * sum(4 * int(np.prod(s)) for s in SHAPES)


def test_a_plain_dispatch_folds_to_the_same_model_as_a_streaming_one() -> None:
    strategy = FedAvgM(server_lr=1.0, server_momentum=0.9)
    state = strategy.initial_state(_model())
    streamed, _ = run_round(state, _plan(), Arrivals(WEIGHTS), strategy)

    class Plain:
        def __call__(self, jobs: Sequence[SiteJob]) -> dict[str, SiteResult | Dropout]:
            return Arrivals(WEIGHTS)(jobs)

    plain, _ = run_round(state, _plan(), Plain(), strategy)
    for a, b in zip(streamed.parameters, plain.parameters, strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_streamed_norm_bound_matches_the_batch_bound() -> None:
    aggregation = UpdateAggregation(norm_bound=3.0)
    strategy = FedAvg(aggregation=aggregation)
    state = strategy.initial_state(_model())
    dispatch = Arrivals(WEIGHTS, scale=0.5)
    after, report = run_round(state, _plan(), dispatch, strategy)
    bounded = [
        LocalUpdate(u.site, 1, bound_norm(u.delta, 3.0), u.num_examples, 0.1, 0.0)
        for u in dispatch.made
    ]
    got = np.concatenate([p.ravel() for p in after.parameters])
    np.testing.assert_allclose(got, _batch_mean(bounded), rtol=1e-6, atol=1e-7)
    assert report.metrics["strategy/norm_bounded"] == len(SITES)  # every one was too long


def test_an_invalid_update_is_refused_on_arrival_and_left_out_of_the_mean() -> None:
    strategy = FedAvg()
    state = strategy.initial_state(_model())

    class OneBad(Arrivals):
        def stream(self, jobs: Sequence[SiteJob]) -> Iterator[tuple[str, SiteResult | Dropout]]:
            for site, answer in super().stream(jobs):
                if site == "s3" and isinstance(answer, SiteResult) and answer.update:
                    answer.update.delta[0][0, 0] = np.nan
                yield site, answer

    dispatch = OneBad(WEIGHTS)
    after, report = run_round(state, _plan(), dispatch, strategy)
    good = [u for u in dispatch.made if u.site != "s3"]
    got = np.concatenate([p.ravel() for p in after.parameters])
    np.testing.assert_allclose(got, _batch_mean(good), rtol=1e-6, atol=1e-7)
    assert [d.site for d in report.dropouts] == ["s3"]
    assert report.dropouts[0].kind is DropoutKind.INVALID


def test_scaffold_still_aggregates_every_update_at_once() -> None:
    assert Scaffold(num_sites=3).fold(FedAvg().initial_state(_model())) is None


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum", "multi_krum", "bulyan"])
def test_a_robust_rule_past_its_memory_bound_is_refused_before_dispatch(rule: str) -> None:
    # 8 sites x 2,458 values x 8 bytes = 0.15 MiB, above a 0.1 MiB bound
    strategy = FedAvg(aggregation=UpdateAggregation(rule=rule, robust_memory_mb=0.1))
    state = strategy.initial_state(_model())
    assert strategy.fold(state) is None

    def never(jobs: Sequence[SiteJob]) -> dict[str, SiteResult | Dropout]:
        raise AssertionError("dispatched a round the coordinator cannot aggregate")

    with pytest.raises(ConfigError) as refused:
        run_round(state, _plan(), never, strategy)
    message = str(refused.value)
    assert "strategy.robust_memory_mb" in message
    assert "0.1" in message and "aggregator: mean" in message
    # within the bound the rule runs as before
    roomy = FedAvg(aggregation=UpdateAggregation(rule=rule, robust_memory_mb=1.0))
    run_round(state, _plan(), Arrivals(WEIGHTS), roomy)


class _Future:
    def __init__(self, value: object) -> None:
        self.value = value
        self.done = False
        self.callbacks: list[Any] = []

    def add_done_callback(self, fn: Any) -> None:  # as concurrent.futures: at once if done
        if self.done:
            fn(self)
        else:
            self.callbacks.append(fn)

    def finish(self) -> None:
        self.done = True
        for fn in self.callbacks:
            fn(self)

    def result(self) -> object:
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


def test_stream_answers_yields_in_arrival_order_and_lets_each_future_go() -> None:
    futures = {s: _Future(SiteResult(s)) for s in ("a", "b", "c")}
    futures["b"].value = RuntimeError("site b crashed")
    handles = dict(futures)
    handles["c"].finish()  # done before the stream starts
    seen = []
    stream = stream_answers(futures)
    for site, answer in stream:
        seen.append((site, type(answer).__name__))
        assert site not in futures  # consumed: nothing here keeps its result
        if site == "c":
            handles["a"].finish()
        if site == "a":
            handles["b"].finish()
    assert seen == [("c", "SiteResult"), ("a", "SiteResult"), ("b", "Dropout")]


def test_under_secure_aggregation_each_masked_answer_is_received_as_it_arrives() -> None:
    """The engine hands each selected site's masked answer to secure aggregation before
    the dispatch makes the next one (so the coordinator never holds the n masked vectors
    at once), keeps what it returns, and passes the rest (refusals, others) untouched."""
    from fl_components.round.engine import MaskedStream, SecureAggregation
    from fl_components.round.types import MaskedContribution

    events: list[str] = []

    class Secure(SecureAggregation):
        def receive(self, answer: SiteResult) -> SiteResult:
            events.append(f"received {answer.site}")
            assert answer.masked is not None
            return SiteResult(site=answer.site, masked=None, bytes_up=answer.bytes_up)

    def masked(site: str) -> SiteResult:
        contribution = MaskedContribution(site, 1, 10, 0.1, 0.0, payload=b"x" * 1000)
        return SiteResult(site=site, masked=contribution, bytes_up=1000)

    def arrivals() -> Iterator[tuple[str, SiteResult | Dropout]]:
        for site in ("s0", "s1", "s2"):
            events.append(f"made {site}")
            yield site, masked(site)
        yield "s3", Dropout("s3", DropoutKind.FAILED, "gone")
        yield "late", masked("late")  # not selected: not received

    plan = RoundPlan(round=1, selected=("s0", "s1", "s2", "s3"), seeds={}, secure=Secure())
    stream = MaskedStream(Secure())
    answers = stream.consume(arrivals(), plan, _model())

    assert events == [
        "made s0", "received s0", "made s1", "received s1", "made s2", "received s2",
    ]  # fmt: skip
    assert stream.peak_held == 1
    assert all(answers[s].masked is None for s in ("s0", "s1", "s2"))  # type: ignore[union-attr]
    assert isinstance(answers["s3"], Dropout)
    assert answers["late"].masked is not None  # type: ignore[union-attr]
