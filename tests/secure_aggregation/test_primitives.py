import math
import os
import stat

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_components.secure_aggregation.protocol import (
    KeyFileError,
    Registry,
    SiteKeys,
    UnknownSiteError,
    agreement,
    shamir,
)
from fl_components.secure_aggregation.protocol.graph import neighbour_graph
from fl_components.secure_aggregation.protocol.prg import MaskExpander, expand
from fl_components.secure_aggregation.protocol.quantize import Quantizer, max_bits


# -- keys ------------------------------------------------------------------------------
def test_keys_save_load_roundtrip_with_0600(tmp_path):
    keys = SiteKeys.generate()
    keys.save(tmp_path / "site-a")
    for name in ("x25519.key", "ed25519.key"):
        assert stat.S_IMODE((tmp_path / "site-a" / name).stat().st_mode) == 0o600
    assert SiteKeys.load(tmp_path / "site-a").public() == keys.public()


def test_keys_refuse_overwrite_and_loose_permissions(tmp_path):
    SiteKeys.generate().save(tmp_path)
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        SiteKeys.generate().save(tmp_path)
    os.chmod(tmp_path / "ed25519.key", 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        SiteKeys.load(tmp_path)


def test_registry_json_roundtrip_and_unknown_site():
    registry = Registry({"a": SiteKeys.generate().public(), "b": SiteKeys.generate().public()})
    again = Registry.from_json(registry.to_json())
    assert dict(again) == dict(registry)
    assert "private" not in registry.to_json()
    with pytest.raises(UnknownSiteError, match="'c' is not in the federation registry"):
        registry["c"]


def test_pairwise_seed_symmetric_and_bound_to_round_and_run():
    a, b = SiteKeys.generate(), SiteKeys.generate()
    ab, ba = a.exchange(b.public()), b.exchange(a.public())
    s1 = agreement.pairwise_seed(ab, run_id="r", round=1, u="a", v="b")
    assert s1 == agreement.pairwise_seed(ba, run_id="r", round=1, u="b", v="a")
    assert len(s1) == 32
    assert s1 != agreement.pairwise_seed(ab, run_id="r", round=2, u="a", v="b")
    assert s1 != agreement.pairwise_seed(ab, run_id="r2", round=1, u="a", v="b")
    assert s1 != agreement.share_key(ab, run_id="r", round=1, u="a", v="b")


# -- PRG -------------------------------------------------------------------------------
def test_prg_is_the_aes256_ctr_keystream():
    seed = bytes(range(32))
    d = 70_001  # spans two chunks and a ragged tail
    iv = bytes(12) + (2).to_bytes(4, "big")  # GCM's first keystream counter block
    reference = Cipher(algorithms.AES(seed), modes.CTR(iv)).encryptor().update(bytes(4 * d))
    np.testing.assert_array_equal(expand(seed, d), np.frombuffer(reference, dtype="<u4"))


def test_prg_add_then_subtract_cancels_mod_2_32():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2**32, 100_000, dtype=np.uint32)
    acc = x.copy()
    seeds = [os.urandom(32) for _ in range(3)]
    expander = MaskExpander(chunk_words=4096)
    expander.apply(acc, add=seeds)
    assert not np.array_equal(acc, x)
    expander.apply(acc, subtract=seeds)
    np.testing.assert_array_equal(acc, x)


def test_prg_different_seeds_give_different_masks():
    assert not np.array_equal(expand(b"\x00" * 32, 64), expand(b"\x00" * 31 + b"\x01", 64))


# -- Shamir ----------------------------------------------------------------------------
def _is_probable_prime(p: int) -> bool:
    d, r = p - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        x = pow(a, d, p)
        if x in (1, p - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, p)
            if x == p - 1:
                break
        else:
            return False
    return True


def test_field_modulus_is_a_256_bit_prime():
    assert shamir.PRIME.bit_length() == 256 and _is_probable_prime(shamir.PRIME)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), data=st.data())
def test_shamir_any_t_shares_rebuild_and_fewer_fail(n, data):
    t = data.draw(st.integers(1, n))
    secret = shamir.random_secret()
    shares = shamir.split(secret, threshold=t, xs=list(range(1, n + 1)))
    subset = data.draw(st.permutations(shares)).copy()[:t]
    assert shamir.reconstruct(subset, threshold=t) == secret
    with pytest.raises(shamir.ThresholdNotMetError, match=f"at least {t}"):
        shamir.reconstruct(subset[: t - 1], threshold=t)
    if t > 1:  # t - 1 shares interpolated as if they were enough give an unrelated value
        few = subset[: t - 1]
        wrong = shamir.combine([s.y for s in few], shamir.lagrange_at_zero([s.x for s in few]))
        assert wrong != secret


def test_shamir_rejects_bad_inputs():
    with pytest.raises(shamir.ContextMismatchError, match="distinct and non-zero"):
        shamir.split(shamir.random_secret(), threshold=1, xs=[0, 1])
    with pytest.raises(shamir.ContextMismatchError, match="below the field prime"):
        shamir.split(b"\xff" * 32, threshold=1, xs=[1])


# -- quantization ----------------------------------------------------------------------
def test_max_bits_leaves_room_for_the_sum():
    for n in (2, 3, 10, 100, 200, 1000):
        assert n * (2 ** max_bits(n) - 1) < 2**32
    assert max_bits(2) == 31 and max_bits(200) == 24


def test_quantizer_rejects_overflowing_bits_with_fix():
    with pytest.raises(Exception, match="use bits between 1 and 25"):
        Quantizer.for_sum(n=100, clip_range=1.0, bits=30)
    with pytest.raises(Exception, match="clip_range must be a finite number > 0"):
        Quantizer.for_sum(n=2, clip_range=0.0)


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(2, 200),
    clip=st.floats(1e-3, 1e3),
    values=st.lists(st.floats(-1e4, 1e4), min_size=1, max_size=50),
)
def test_quantize_roundtrip_within_bound(n, clip, values):
    q = Quantizer.for_sum(n=n, clip_range=clip)
    x = np.array(values)
    ints = q.quantize(x, rng=np.random.default_rng(0))
    assert ints.dtype == np.uint32 and int(ints.max()) <= q.levels
    back = q.dequantize_sum(ints, count=1)
    assert np.all(np.abs(back - np.clip(x, -clip, clip)) <= q.error_bound(1))


def test_stochastic_rounding_is_unbiased():
    q = Quantizer.for_sum(n=2, clip_range=1.0, bits=4)  # coarse: 15 levels
    x = np.full(200_000, 0.123)
    mean = q.dequantize_sum(q.quantize(x, rng=np.random.default_rng(3)), count=1).mean()
    assert math.isclose(mean, 0.123, abs_tol=2e-3)


def test_quantize_refuses_nan():
    q = Quantizer.for_sum(n=2, clip_range=1.0)
    with pytest.raises(Exception, match="NaN or infinite"):
        q.quantize(np.array([0.0, np.nan]), rng=np.random.default_rng(0))


# -- SecAgg+ graph ---------------------------------------------------------------------
@pytest.mark.parametrize(("n", "k"), [(10, 4), (50, 12), (101, 14), (7, 3)])
def test_neighbour_graph_is_symmetric_regular_and_public(n, k):
    sites = [f"s{i}" for i in range(n)]
    graph = neighbour_graph(sites, k=k, run_id="r", round=5)
    assert graph == neighbour_graph(list(reversed(sites)), k=k, run_id="r", round=5)
    assert graph != neighbour_graph(sites, k=k, run_id="r", round=6)
    degree = 2 * ((k + 1) // 2)
    for site, peers in graph.items():
        assert site not in peers and len(peers) == degree
        assert all(site in graph[p] for p in peers)
