"""Shamir secret sharing, t of n, over the prime field GF(2^521 − 1).

Why: secure aggregation (:mod:`~fedfair_med.privacy.secure_sum`) lets the aggregator remove the
masks of a site that dropped out only if enough *other* sites help. Each site splits its round's
mask key into n shares; any t of them give the key back (Lagrange interpolation at 0), any t − 1
are uniformly distributed and say nothing about it (Shamir, "How to share a secret", CACM 1979).

The field is GF(P) with the Mersenne prime P = 2^521 − 1, so a 32-byte key (< 2^256) is one field
element and needs no splitting into chunks. Share i is the value at x = i of a random polynomial of
degree t − 1 whose constant term is the secret; x runs over 1..n (never 0). Coefficients come from
:mod:`secrets` (the operating system's CSPRNG).
"""

from __future__ import annotations

import secrets
from typing import Mapping

#: The Mersenne prime 2^521 − 1: every 32-byte secret is a field element.
PRIME = (1 << 521) - 1
#: Bytes of one serialised share value (521 bits round up to 66 bytes).
SHARE_BYTES = 66


class ShamirError(ValueError):
    """Shares that cannot give a secret back (too few, duplicated, malformed)."""


def split(secret: int, threshold: int, num_shares: int) -> dict[int, int]:
    """``{x: f(x)}`` for x = 1..num_shares; any ``threshold`` of them reconstruct ``secret``."""
    threshold, num_shares = int(threshold), int(num_shares)
    if not 1 <= threshold <= num_shares:
        raise ShamirError(f"threshold {threshold} must be between 1 and the number of shares {num_shares}")
    if not 0 <= secret < PRIME:
        raise ShamirError("the secret must be an integer in [0, 2^521 − 1)")
    coefficients = [int(secret)] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in range(1, num_shares + 1):
        value = 0
        for c in reversed(coefficients):  # Horner
            value = (value * x + c) % PRIME
        shares[x] = value
    return shares


def combine(shares: Mapping[int, int], threshold: int) -> int:
    """The secret from at least ``threshold`` shares ``{x: f(x)}`` (Lagrange interpolation at 0).

    Fewer than ``threshold`` shares are refused: interpolating them would silently give a wrong
    value, never the secret.
    """
    points = {int(x): int(y) % PRIME for x, y in shares.items()}
    if len(points) < int(threshold):
        raise ShamirError(f"{len(points)} share(s) given, at least {threshold} needed")
    if any(not 0 < x < PRIME for x in points):
        raise ShamirError("share positions must be in 1..P−1")
    xs = sorted(points)[: int(threshold)]  # any t distinct points fix the polynomial
    secret = 0
    for i in xs:
        numerator, denominator = 1, 1
        for j in xs:
            if j != i:
                numerator = numerator * (-j) % PRIME
                denominator = denominator * (i - j) % PRIME
        secret = (secret + points[i] * numerator * pow(denominator, -1, PRIME)) % PRIME
    return secret


def split_bytes(secret: bytes, threshold: int, num_shares: int) -> dict[int, bytes]:
    """:func:`split` for a byte string of at most 64 bytes; shares as :data:`SHARE_BYTES` bytes."""
    if len(secret) > 64:
        raise ShamirError("at most 64 bytes can be shared as one field element")
    # a leading 0x01 keeps leading zero bytes of the secret
    value = int.from_bytes(b"\x01" + bytes(secret), "big")
    return {x: y.to_bytes(SHARE_BYTES, "big") for x, y in split(value, threshold, num_shares).items()}


def combine_bytes(shares: Mapping[int, bytes], threshold: int, length: int | None = None) -> bytes:
    """Inverse of :func:`split_bytes`; ``length``: the secret's known size in bytes (then a wrong
    share is caught except with probability ~2^-(8 (65 − length))."""
    if any(len(v) != SHARE_BYTES for v in shares.values()):
        raise ShamirError(f"a share must be {SHARE_BYTES} bytes")
    value = combine({x: int.from_bytes(v, "big") for x, v in shares.items()}, threshold)
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    if not raw or raw[0] != 1 or len(raw) > 65 or (length is not None and len(raw) != length + 1):
        raise ShamirError("the shares do not combine to a secret made by split_bytes")
    return raw[1:]
