"""Secure summation by pairwise additive masking: the aggregator learns only Σ_s x_s.

Why our own: OpenFL 1.9's ``secure_aggregation`` adds *one scalar* float mask (Python's
``random.random()``) to every element of a tensor, so differences between elements are sent in
the clear, and it replaces the task's aggregation function with a weighted average, which would
bypass our methods' server hooks. This module is the masking step of Bonawitz et al., "Practical
Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017 (without its dropout
recovery — see below).

Maths. Every pair of sites (i, j) agrees on a 32-byte seed k_ij by X25519 key agreement
(Diffie–Hellman on Curve25519; only public keys travel) followed by HKDF-SHA256 bound to the
federation id. For each message (a round and a tensor name) the seed expands with ChaCha20 into a
mask m_ij uniform on Z_{2^64}. Site s sends

    y_s = enc(x_s) + Σ_{j > s} m_sj − Σ_{j < s} m_js   (mod 2^64)

so Σ_s y_s = Σ_s enc(x_s) (mod 2^64): every mask is added once and subtracted once. With at least
two sites, each y_s alone is uniform on Z_{2^64} (a one-time pad keyed by a secret the aggregator
does not hold), so the aggregator learns nothing about x_s beyond the sum.

Fixed point. enc(x) = round(x · 2^FRACTION_BITS) as a two's-complement 64-bit integer; with
FRACTION_BITS = 24 one unit is 2^-24 ≈ 6.0e-8 and each site's rounding error is at most 2^-25
per element, so a sum over S sites is exact to within S · 2^-25. The decoded sum is correct only
if the true integer sum fits: Σ_s |x_s| < 2^(63 − 24) = 2^39 ≈ 5.5e11 per element.
:func:`encode` refuses any |x| ≥ :func:`max_abs_value`(S) = 2^39 / S, so no sum of S encoded
values can overflow. Non-finite values are refused too.

Dropouts. If a site that was expected does not send, the masks it shares with the others do not
cancel and the "sum" is uniform noise. There is no recovery here (Bonawitz et al. recover with
secret-shared seeds); :func:`unmask_sum` refuses a set of senders that is not exactly the set the
masks were made for, and the runtime refuses the round with a clear error.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Mapping, Sequence

import numpy as np

FRACTION_BITS = 24
SCALE = float(2 ** FRACTION_BITS)
#: Largest |Σ_s x_s| that decodes correctly (exclusive).
SUM_BOUND = float(2 ** (63 - FRACTION_BITS))


class SecureSumError(ValueError):
    """A secure sum cannot be formed (missing sites, overflow, a bad key)."""


def max_abs_value(num_sites: int) -> float:
    """Largest |x| one site may encode so that a sum over ``num_sites`` cannot overflow."""
    return SUM_BOUND / max(int(num_sites), 1)


def encode(values: np.ndarray, num_sites: int) -> np.ndarray:
    """Fixed-point encoding of a float array as uint64 (two's complement), range-checked."""
    x = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise SecureSumError("secure sum: cannot encode NaN or infinite values")
    limit = max_abs_value(num_sites)
    if x.size and float(np.max(np.abs(x))) >= limit:
        raise SecureSumError(f"secure sum: |value| {float(np.max(np.abs(x))):.3g} ≥ {limit:.3g}, the "
                             f"largest a site may send so that a sum over {num_sites} sites fits "
                             f"in 64-bit fixed point (scale 2^{FRACTION_BITS})")
    return np.rint(x * SCALE).astype(np.int64).view(np.uint64)


def decode(encoded: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode` for a (sum of) encoded array(s)."""
    return np.asarray(encoded, dtype=np.uint64).view(np.int64).astype(np.float64) / SCALE


# ---- key agreement ------------------------------------------------------------------------
def generate_keypair() -> tuple[bytes, bytes]:
    """(private key, public key) as 32 raw bytes each; X25519."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    key = X25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return private, public


def pair_seed(private_key: bytes, peer_public_key: bytes, context: str) -> bytes:
    """The seed k_ij both sites of a pair derive; the same from either side, secret to others."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    try:
        shared = X25519PrivateKey.from_private_bytes(bytes(private_key)).exchange(
            X25519PublicKey.from_public_bytes(bytes(peer_public_key)))
    except ValueError as err:
        raise SecureSumError(f"secure sum: bad key-agreement key ({err})") from None
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"fedfair-med secure sum|" + context.encode()).derive(shared)


def mask(seed: bytes, label: str, size: int) -> np.ndarray:
    """``size`` uint64 words, uniform, from ChaCha20 keyed by ``seed`` with a nonce from ``label``."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    nonce = hashlib.sha256(label.encode()).digest()[:16]
    stream = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(8 * int(size))), dtype=np.uint64).copy()


class SecureSumParty:
    """One site's side: masks its encoded tensors so that only the sum over all sites decodes."""

    def __init__(self, site: str, sites: Sequence[str], private_key: bytes,
                 public_keys: Mapping[str, bytes], context: str) -> None:
        self.sites = sorted(sites)
        if site not in self.sites or len(set(self.sites)) != len(self.sites):
            raise SecureSumError(f"secure sum: {site!r} is not one of the distinct sites {self.sites}")
        if len(self.sites) < 2:
            raise SecureSumError("secure sum needs at least two sites (one site's sum is its value)")
        missing = [s for s in self.sites if s not in public_keys]
        if missing:
            raise SecureSumError(f"secure sum: no public key for site(s) {missing}")
        self.site = site
        self._seeds = {peer: pair_seed(private_key, public_keys[peer], context)
                       for peer in self.sites if peer != site}

    def mask(self, values: np.ndarray, label: str) -> np.ndarray:
        """y_s = enc(x_s) + Σ_{j>s} m_sj − Σ_{j<s} m_js (mod 2^64), same shape as ``values``."""
        x = np.asarray(values)
        out = encode(x, len(self.sites)).reshape(-1)
        for peer, seed in self._seeds.items():
            m = mask(seed, label, out.size)
            out = out + m if self.site < peer else out - m  # uint64 arithmetic wraps mod 2^64
        return out.reshape(x.shape)


def unmask_sum(masked: Mapping[str, np.ndarray], sites: Iterable[str]) -> np.ndarray:
    """Σ_s y_s decoded to float64; refuses unless exactly the sites the masks were made for sent."""
    expected, got = sorted(sites), sorted(masked)
    if expected != got:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise SecureSumError(
            "secure sum: the masks cancel only over the full set of sites; "
            + (f"missing {missing}" if missing else "") + (f" unexpected {extra}" if extra else "")
            + " — the round cannot be aggregated (no dropout recovery)")
    total = np.zeros(np.asarray(masked[got[0]]).shape, dtype=np.uint64)
    for s in got:
        y = np.asarray(masked[s])
        if y.dtype != np.uint64 or y.shape != total.shape:
            raise SecureSumError(f"secure sum: site {s!r} sent {y.dtype}{list(y.shape)}, expected "
                                 f"uint64{list(total.shape)}")
        total = total + y
    return decode(total)
