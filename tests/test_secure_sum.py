"""Pairwise additive masking: the sum decodes, a single site's message looks like noise."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedfair_med.privacy.secure_sum import (
    FRACTION_BITS, SecureSumError, SecureSumParty, decode, encode, generate_keypair, max_abs_value,
    pair_seed, unmask_sum,
)

SITES = ["site-a", "site-b", "site-c"]


def parties(sites=SITES, context="fed-1"):
    keys = {s: generate_keypair() for s in sites}
    public = {s: pub for s, (_, pub) in keys.items()}
    return {s: SecureSumParty(s, sites, keys[s][0], public, context) for s in sites}


def test_pair_seeds_agree_only_within_the_pair_and_context() -> None:
    (a, a_pub), (b, b_pub), (c, c_pub) = generate_keypair(), generate_keypair(), generate_keypair()
    assert pair_seed(a, b_pub, "x") == pair_seed(b, a_pub, "x")
    assert pair_seed(a, b_pub, "x") != pair_seed(a, c_pub, "x")
    assert pair_seed(a, b_pub, "x") != pair_seed(a, b_pub, "y")  # another federation


def test_masked_sum_equals_plain_sum_within_fixed_point_tolerance() -> None:
    rng = np.random.default_rng(0)
    values = {s: rng.normal(scale=50.0, size=(7, 5)) for s in SITES}
    ps = parties()
    masked = {s: ps[s].mask(values[s], "round 3|conv.weight") for s in SITES}
    total = unmask_sum(masked, SITES)
    plain = sum(values[s] for s in SITES)
    assert np.max(np.abs(total - plain)) <= len(SITES) * 2.0 ** -(FRACTION_BITS + 1)
    # what each site sends differs from its own encoding everywhere, and from its plain values
    for s in SITES:
        assert np.all(masked[s] != encode(values[s], len(SITES)))
        assert np.all(np.abs(decode(masked[s]) - values[s]) > 1.0)


def test_a_single_message_is_uniform_noise_even_for_a_constant_tensor() -> None:
    ps = parties()
    y = ps["site-b"].mask(np.zeros(20000), "round 1|w")
    # top 16 bits of the 64-bit words: uniform on 65536 values (KS test against the uniform cdf)
    top = (y >> np.uint64(48)).astype(np.float64) / 65536.0
    assert stats.kstest(top, "uniform").pvalue > 1e-3
    assert len(np.unique(y)) == y.size  # no structure of the all-zero input survives
    # another round or tensor gets fresh masks
    assert np.all(ps["site-b"].mask(np.zeros(5), "round 2|w") != ps["site-b"].mask(np.zeros(5), "round 1|w"))


def test_only_the_full_set_of_sites_decodes() -> None:
    ps = parties()
    masked = {s: ps[s].mask(np.ones(4), "r") for s in SITES}
    with pytest.raises(SecureSumError, match="missing"):
        unmask_sum({s: masked[s] for s in SITES[:2]}, SITES)
    # a partial sum is garbage, not the partial plain sum
    partial = decode(masked["site-a"] + masked["site-b"])
    assert np.all(np.abs(partial - 2.0) > 1.0)
    with pytest.raises(SecureSumError, match="uint64"):
        unmask_sum({**masked, "site-c": masked["site-c"].astype(np.float64)}, SITES)


def test_refuses_overflow_non_finite_and_missing_keys() -> None:
    ps = parties()
    with pytest.raises(SecureSumError, match="fits"):
        ps["site-a"].mask(np.array([max_abs_value(3)]), "r")
    with pytest.raises(SecureSumError, match="NaN"):
        ps["site-a"].mask(np.array([np.nan]), "r")
    private, public = generate_keypair()
    with pytest.raises(SecureSumError, match="no public key"):
        SecureSumParty("site-a", SITES, private, {"site-a": public}, "c")
    with pytest.raises(SecureSumError, match="two sites"):
        SecureSumParty("site-a", ["site-a"], private, {"site-a": public}, "c")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=6),
       st.integers(min_value=2, max_value=4))
def test_encode_decode_error_is_at_most_half_a_unit(values, num_sites) -> None:
    x = np.array(values)
    assert np.max(np.abs(decode(encode(x, num_sites)) - x)) <= 2.0 ** -(FRACTION_BITS + 1)
