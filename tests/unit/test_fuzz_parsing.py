"""Fuzzing what fedpipe parses: any input parses or is refused with the project's own error.

Config files and mappings (as the CLI reads them: :class:`ConfigError`, pydantic's
``ValidationError`` already turned into one by :func:`config_from_dict`), a site's CSV files
(:class:`DataError`), and what crosses the site boundary (:class:`ExchangeError` or another
:class:`FedpipeError`): never a ``KeyError``, ``ValueError`` or ``MemoryError`` traceback.
"""

from __future__ import annotations

import base64
import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_components.config import FederationConfig, config_from_dict, load_config
from fl_components.data.site_files import read_split
from fl_components.errors import ConfigError, DataError, FedpipeError
from fl_components.exchange import (
    ExchangeError,
    decode_arrays,
    parse_json_payload,
    read_global_model,
    update_payload,
)
from fl_components.round.types import JobKind, LocalUpdate, SiteJob
from fl_components.secure_aggregation.site_stages import context_from_json
from fl_components.wire.site_answer import answer_from_payload, instructions_from_payload

FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# keys the config tree knows, so random mappings reach nested validators, plus noise
_CONFIG_KEYS = sorted(
    {
        *FederationConfig.model_fields,
        *(
            name
            for field in FederationConfig.model_fields.values()
            for name in getattr(field.annotation, "model_fields", {})
        ),
    }
)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["site_files", "bundled", "fedavg", "krum", "site", "run", "record"])
)
_keys = st.sampled_from(_CONFIG_KEYS) | st.text(max_size=8)
_json_like = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=5),
    max_leaves=25,
)


@FUZZ
@given(raw=st.dictionaries(_keys, _json_like, max_size=8))
def test_any_config_mapping_parses_or_is_a_config_error(raw: dict[str, Any]) -> None:
    try:
        config = config_from_dict(raw, source="fuzz.yaml")
    except ConfigError as error:
        assert str(error).startswith("fuzz.yaml: ")
    else:
        assert isinstance(config, FederationConfig)


@FUZZ
@given(
    text=st.one_of(
        st.text(max_size=200),
        st.text(alphabet="{}[]:,-?!&*|>'\"#\n 0123456789abc.", max_size=120),
        st.builds(lambda d: f"name: x\nseed: {d}\n", st.dates().map(str)),
        st.just("a: 2020-02-30\n"),
        st.sampled_from([60, 700]).map(lambda n: "[" * n),
    )
)
def test_any_config_text_loads_or_is_a_config_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fed.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            load_config(path)
        except ConfigError as error:
            assert str(path) in str(error)


def test_a_config_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "fed.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    try:
        load_config(path)
    except ConfigError as error:
        assert "not UTF-8" in str(error)
    else:  # pragma: no cover
        raise AssertionError("a Latin-1 file was read as UTF-8")


_cell = st.one_of(
    st.integers(min_value=-5, max_value=12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "nan", "inf", "cat", '"a,b"', "1e400", "0.5", " ", "True"]),
    st.text(alphabet="0123456789.-e,\"'\n\r;x", max_size=6),
)


@st.composite
def _csv_text(draw: st.DrawFn) -> str:
    columns = draw(st.lists(st.sampled_from(["a", "b", "label", "c", ""]), min_size=0, max_size=4))
    rows = draw(st.lists(st.lists(_cell, min_size=0, max_size=5), max_size=6))
    lines = [",".join(columns)] + [",".join(row) for row in rows]
    return "\n".join(lines) + draw(st.sampled_from(["", "\n", "\r\n"]))


@FUZZ
@given(
    content=st.one_of(_csv_text().map(str.encode), st.binary(max_size=300)),
    n_classes=st.one_of(st.none(), st.integers(min_value=2, max_value=12)),
)
def test_any_site_csv_reads_or_is_a_data_error_naming_the_file(
    content: bytes, n_classes: int | None
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.csv"
        path.write_bytes(content)
        try:
            split = read_split(path, n_classes=n_classes)
        except DataError as error:
            assert str(path) in str(error)
        else:
            assert split.features.dtype == np.float32 and split.labels.dtype == np.int64
            assert np.isfinite(split.features).all() and len(split) >= 1
            assert (split.labels >= 0).all()
            if n_classes is not None:
                assert (split.labels < n_classes).all()


@FUZZ
@given(content=st.binary(max_size=400))
def test_any_npz_bytes_read_or_are_a_data_error(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.npz"
        path.write_bytes(b"PK\x03\x04" + content if content[:1] == b"P" else content)
        try:
            read_split(path)
        except DataError as error:
            assert str(path) in str(error)


def _good_update_payload() -> dict[str, Any]:
    update = LocalUpdate(
        site="a",
        round=2,
        delta=[np.ones((2, 3), np.float32), np.zeros(3, np.float32)],
        num_examples=5,
        train_loss=0.25,
        seconds=0.1,
    )
    return update_payload(update)


def _mutations(payload: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A real payload with some fields replaced, removed or added."""
    keys = st.sampled_from([*payload, "delta", "shapes", "data", "evaluation", "stage", "kind"])
    return st.builds(
        lambda replace, drop: {
            **{k: v for k, v in payload.items() if k not in drop},
            **replace,
        },
        st.dictionaries(keys, _json_like, max_size=3),
        st.sets(keys, max_size=2),
    )


_jobs = st.builds(
    SiteJob,
    site=st.just("a"),
    kind=st.sampled_from(list(JobKind)),
    round=st.just(2),
    evaluate_round=st.one_of(st.none(), st.just(1)),
)


@FUZZ
@given(
    payload=st.one_of(
        _mutations(_good_update_payload()),
        st.dictionaries(_keys, _json_like, max_size=6),
        _json_like,
    ),
    job=_jobs,
)
def test_any_site_answer_parses_or_is_refused(payload: Any, job: SiteJob) -> None:
    with contextlib.suppress(FedpipeError):
        answer_from_payload(payload, job=job, size=len(json.dumps(payload, default=str)))


def test_an_oversized_answer_is_refused_before_reading() -> None:
    job = SiteJob(site="a", kind=JobKind.TRAIN, round=2)
    try:
        answer_from_payload({}, job=job, size=10**12)
    except ExchangeError as error:
        assert "above the" in str(error) and "FEDPIPE_MAX_PAYLOAD_BYTES" in str(error)
    else:  # pragma: no cover
        raise AssertionError("a 1 TB answer was accepted")


@FUZZ
@given(
    encoded=st.one_of(
        st.fixed_dictionaries(
            {
                "dtype": st.sampled_from(["float32", "float64"]),
                "shapes": st.lists(
                    st.lists(st.integers(min_value=-2, max_value=10**12), max_size=3), max_size=3
                ),
                "data": st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
            }
        ),
        st.dictionaries(st.sampled_from(["dtype", "shapes", "data"]), _json_like),
    )
)
def test_any_encoded_arrays_decode_or_are_refused_without_allocating(encoded: Any) -> None:
    try:
        arrays = decode_arrays(encoded)
    except FedpipeError:
        pass
    else:
        assert sum(a.size for a in arrays) * 4 == len(base64.b64decode(encoded["data"]))


@FUZZ
@given(payload=st.one_of(st.dictionaries(_keys, _json_like, max_size=5), _json_like))
def test_any_instructions_parse_or_are_refused(payload: Any) -> None:
    if not isinstance(payload, dict):
        payload = {"server_control": payload}
    with contextlib.suppress(FedpipeError):
        instructions_from_payload(payload)


@FUZZ
@given(text=st.one_of(st.text(max_size=80), _json_like.map(json.dumps)))
def test_any_json_text_and_round_context_parse_or_are_refused(text: str) -> None:
    try:
        parse_json_payload(text, what="fuzz")
    except ExchangeError as error:
        assert str(error).startswith("fuzz: ")
    with contextlib.suppress(ExchangeError):
        context_from_json(text)


def test_an_oversized_json_payload_is_refused_unparsed() -> None:
    try:
        parse_json_payload("[" * 2000, what="answer", limit=1000)
    except ExchangeError as error:
        assert "answer: 2000 bytes, above the 1000-byte limit" in str(error)
    else:  # pragma: no cover
        raise AssertionError("an oversized payload was parsed")


@FUZZ
@given(content=st.binary(max_size=300))
def test_any_global_model_file_is_verified_or_refused(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.npz"
        path.write_bytes(content)
        with contextlib.suppress(ExchangeError):
            read_global_model(str(path), sha256="0" * 64)
