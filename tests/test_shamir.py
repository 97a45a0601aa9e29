"""Shamir secret sharing: any t shares give the secret back, t − 1 do not."""

from __future__ import annotations

import itertools
import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfair_med.privacy.shamir import (
    PRIME, ShamirError, combine, combine_bytes, split, split_bytes,
)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 7), data=st.data())
def test_any_t_shares_reconstruct_and_t_minus_1_do_not(n: int, data) -> None:
    t = data.draw(st.integers(2, n))
    secret = data.draw(st.integers(0, PRIME - 1))
    shares = split(secret, t, n)
    assert sorted(shares) == list(range(1, n + 1))
    for subset in itertools.combinations(shares, t):
        assert combine({x: shares[x] for x in subset}, t) == secret
    # t − 1 shares: refused outright, and interpolating them as if t − 1 were enough misses
    fewer = {x: shares[x] for x in list(shares)[: t - 1]}
    with pytest.raises(ShamirError, match="at least"):
        combine(fewer, t)
    if t > 2:
        assert combine(fewer, t - 1) != secret


def test_t_minus_1_shares_are_consistent_with_every_secret() -> None:
    """Perfect secrecy, checked directly: for t − 1 shares of secret s and *any* other secret s',
    a polynomial of degree t − 1 through those shares with constant term s' exists — so the
    shares cannot tell s from s'."""
    t, n = 3, 5
    secret, other = 12345, 67890
    shares = split(secret, t, n)
    seen = {1: shares[1], 2: shares[2]}
    # evaluate the interpolant through (0, other), (1, y1), (2, y2) at x = 3 by Lagrange
    xs = {0: other, **seen}
    y3 = 0
    for i, yi in xs.items():
        num, den = 1, 1
        for j in xs:
            if j != i:
                num, den = num * (3 - j) % PRIME, den * (i - j) % PRIME
        y3 = (y3 + yi * num * pow(den, -1, PRIME)) % PRIME
    assert combine({**seen, 3: y3}, t) == other
    assert combine({**seen, 3: shares[3]}, t) == secret


def test_byte_secrets_round_trip_including_leading_zeros_and_wrong_shares_fail() -> None:
    for secret in (bytes(32), b"\x00\x01" + secrets.token_bytes(30), secrets.token_bytes(32)):
        shares = split_bytes(secret, 3, 4)
        assert combine_bytes({x: shares[x] for x in (1, 3, 4)}, 3) == secret
        assert combine_bytes({x: shares[x] for x in (2, 3, 4)}, 3) == secret
    shares = split_bytes(secrets.token_bytes(32), 3, 4)
    broken = {1: shares[1], 2: shares[2], 3: bytes(66)}
    with pytest.raises(ShamirError):  # a random field element is a 32-byte secret w.p. ~2^-257
        combine_bytes(broken, 3, length=32)
    with pytest.raises(ShamirError):
        split(5, 4, 3)
