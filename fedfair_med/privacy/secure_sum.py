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

Dropouts (Bonawitz et al. §4; Bell et al., CCS 2020, "SecAgg+"). The pair seeds of a round come
from a *fresh* X25519 key per site and round (:class:`RoundKeys`), never from the site's long-term
key. Before masking, each site splits its round private key with Shamir's scheme, t of n
(:mod:`~fedfair_med.privacy.shamir`), and sends share j to peer j encrypted with ChaCha20-Poly1305
under a pairwise *channel* key (X25519 of the long-term keys + HKDF), relayed by the aggregator.
If a site d stops after the others masked against its round key, every survivor reveals the share
of d's key it holds; from t of them the aggregator rebuilds d's round private key (checked against
d's round public key), recomputes the pair seeds k_dj with every survivor j and removes those
masks (:class:`Unmasker`). What that reveals: d's round key, which masked only this round's
upload that d never sent. A survivor reveals shares only for sites the aggregator says dropped;
no self-masks (Bonawitz's b_u) are used, so an aggregator that *lies* about a drop-out (claims a
site that did upload dropped) could unmask that site — the model is an honest-but-curious
aggregator, and ours discards an upload that arrives after it declared the site dropped.
:func:`unmask_sum` (no drop-outs) still refuses a set of senders that is not exactly the set the
masks were made for.
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
            + " — recover the dropped sites' masks with an Unmasker")
    total = np.zeros(np.asarray(masked[got[0]]).shape, dtype=np.uint64)
    for s in got:
        y = np.asarray(masked[s])
        if y.dtype != np.uint64 or y.shape != total.shape:
            raise SecureSumError(f"secure sum: site {s!r} sent {y.dtype}{list(y.shape)}, expected "
                                 f"uint64{list(total.shape)}")
        total = total + y
    return decode(total)


# ---- drop-out recovery (threshold secret sharing of the round keys) -------------------------
def default_threshold(num_sites: int) -> int:
    """The smallest majority, ⌊n/2⌋ + 1: tolerates ⌈n/2⌉ − 1 drop-outs."""
    return int(num_sites) // 2 + 1


def threshold_problem(threshold: int, num_sites: int) -> str | None:
    """Why ``threshold`` is not allowed for ``num_sites`` sites (None: it is).

    Rule: n/2 < t ≤ n. t ≤ n so that a round with no drop-out can complete; t > n/2 so that no two
    disjoint groups of sites both reach t — the aggregator then cannot collect the shares of a
    site's key from one group while treating that site as a survivor for another (Bonawitz et
    al.'s condition), and at least two sites' sums are always combined (n ≥ 2 ⇒ t ≥ 2).
    """
    t, n = int(threshold), int(num_sites)
    if n < 2:
        return "secure aggregation needs at least two sites"
    if not 2 * t > n or t > n:
        return (f"threshold {t} is not allowed for {n} sites: it must satisfy n/2 < t ≤ n "
                f"(here {n // 2 + 1}..{n})")
    return None


def channel_key(private_key: bytes, peer_public_key: bytes, context: str) -> bytes:
    """The pairwise key that encrypts key shares between two sites (long-term X25519 keys)."""
    return pair_seed(private_key, peer_public_key, context + "|share-channel")


def _aead_parts(label: str, sender: str, recipient: str) -> tuple[bytes, bytes]:
    aad = f"{label}|{sender}->{recipient}".encode()
    return hashlib.sha256(b"nonce|" + aad).digest()[:12], aad


def encrypt_share(key: bytes, share: bytes, label: str, sender: str, recipient: str) -> bytes:
    """ChaCha20-Poly1305 of one share; the label and both names are authenticated."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    nonce, aad = _aead_parts(label, sender, recipient)
    return ChaCha20Poly1305(key).encrypt(nonce, bytes(share), aad)


def decrypt_share(key: bytes, ciphertext: bytes, label: str, sender: str, recipient: str) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    nonce, aad = _aead_parts(label, sender, recipient)
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, bytes(ciphertext), aad)
    except InvalidTag:
        raise SecureSumError(f"secure sum: the key share {sender} → {recipient} for {label!r} does "
                             "not authenticate (tampered, or another round's)") from None


def public_from_private(private_key: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return X25519PrivateKey.from_private_bytes(bytes(private_key)).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def share_position(site: str, sites: Sequence[str]) -> int:
    """Shamir x-coordinate of ``site``: its 1-based index among the sorted sites."""
    return sorted(sites).index(site) + 1


class RoundKeys:
    """One site's keys for one masked phase: a fresh X25519 mask key, shared t of n with its peers.

    ``channel_private`` / ``channel_publics`` are the long-term keys (published at ``certify``);
    they only encrypt the shares. ``label`` names the round and phase (it binds nonces and seeds).
    """

    def __init__(self, site: str, sites: Sequence[str], threshold: int, channel_private: bytes,
                 channel_publics: Mapping[str, bytes], context: str, label: str) -> None:
        from fedfair_med.privacy import shamir

        self.sites = sorted(sites)
        problem = threshold_problem(threshold, len(self.sites))
        if problem:
            raise SecureSumError(f"secure sum: {problem}")
        if site not in self.sites:
            raise SecureSumError(f"secure sum: {site!r} is not one of the sites {self.sites}")
        self.site, self.threshold, self.context, self.label = site, int(threshold), context, label
        self._channel_private = bytes(channel_private)
        self._channel_publics = {s: bytes(v) for s, v in channel_publics.items()}
        self.private, self.public = generate_keypair()
        shares = shamir.split_bytes(self.private, self.threshold, len(self.sites))
        self.encrypted: dict[str, bytes] = {}
        for peer in self.sites:
            if peer == site:
                continue
            if peer not in self._channel_publics:
                raise SecureSumError(f"secure sum: no long-term public key for site {peer!r}")
            key = channel_key(self._channel_private, self._channel_publics[peer], context)
            self.encrypted[peer] = encrypt_share(key, shares[share_position(peer, self.sites)], label,
                                                 site, peer)

    def party(self, round_publics: Mapping[str, bytes]) -> SecureSumParty:
        """The masking party over the sites that advertised a round key (``round_publics``)."""
        return SecureSumParty(self.site, sorted(round_publics), self.private, round_publics,
                              self.context + "|" + self.label)

    def reveal(self, dropped: Sequence[str], received: Mapping[str, bytes],
               survivors: Sequence[str]) -> dict[str, bytes]:
        """The shares this site holds of the dropped sites' round keys, decrypted.

        ``received[d]`` is what d encrypted to this site. Refused when this site itself is named
        dropped, when a survivor is named dropped too, or when fewer than t survivors are left —
        in each case revealing could unmask someone.
        """
        dropped, survivors = sorted(set(dropped)), sorted(set(survivors))
        if self.site in dropped or set(dropped) & set(survivors):
            raise SecureSumError("secure sum: a site cannot be both dropped and a survivor")
        if len(survivors) < self.threshold:
            raise SecureSumError(f"secure sum: only {len(survivors)} survivor(s), fewer than the "
                                 f"threshold {self.threshold}; revealing nothing")
        out = {}
        for d in dropped:
            if d not in received:
                continue  # d never sent this site a share (it dropped before sharing)
            key = channel_key(self._channel_private, self._channel_publics[d], self.context)
            out[d] = decrypt_share(key, received[d], self.label, d, self.site)
        return out


class Unmasker:
    """The aggregator's side of a round with drop-outs: Σ over the survivors, masks removed.

    ``round_publics``: the round public keys of the sites that advertised (the masking set U1);
    ``survivors``: those whose masked upload was accepted (U2 ⊆ U1); ``revealed[j][d]``: the share
    of d's round key that survivor j revealed. Needs ≥ t shares for each dropped site.
    """

    def __init__(self, sites: Sequence[str], threshold: int, round_publics: Mapping[str, bytes],
                 survivors: Sequence[str], revealed: Mapping[str, Mapping[str, bytes]],
                 context: str, label: str) -> None:
        from fedfair_med.privacy import shamir

        self.sites = sorted(sites)
        self.masking = sorted(round_publics)
        self.survivors = sorted(survivors)
        if set(self.survivors) - set(self.masking):
            raise SecureSumError(f"secure sum: site(s) {sorted(set(self.survivors) - set(self.masking))} "
                                 "uploaded without a round key")
        self.dropped = sorted(set(self.masking) - set(self.survivors))
        if len(self.survivors) < int(threshold):
            raise SecureSumError(
                f"secure aggregation: only {len(self.survivors)} of {len(self.sites)} sites uploaded, "
                f"fewer than the threshold {threshold}; missing: "
                f"{', '.join(sorted(set(self.sites) - set(self.survivors)))}")
        seed_context = context + "|" + label
        self._corrections: list[tuple[bytes, int]] = []  # (seed, +1 / −1 to add back)
        for d in self.dropped:
            shares = {share_position(j, self.sites): revealed[j][d] for j in self.survivors
                      if d in revealed.get(j, {})}
            if len(shares) < int(threshold):
                raise SecureSumError(
                    f"secure aggregation: only {len(shares)} share(s) of dropped site {d}'s key "
                    f"(threshold {threshold}); its masks cannot be removed")
            try:
                private = shamir.combine_bytes(shares, threshold, length=32)
            except shamir.ShamirError as err:
                raise SecureSumError(f"secure aggregation: shares of {d}'s key: {err}") from None
            if len(private) != 32 or public_from_private(private) != bytes(round_publics[d]):
                raise SecureSumError(f"secure aggregation: the revealed shares of {d}'s key do not "
                                     "match its round public key (a share is wrong)")
            for j in self.survivors:
                seed = pair_seed(private, round_publics[j], seed_context)
                # survivor j added +m if j < d, −m if j > d: take it away again
                self._corrections.append((seed, -1 if j < d else +1))

    def sum(self, masked: Mapping[str, np.ndarray], label: str) -> np.ndarray:
        """Σ_{j ∈ survivors} x_j decoded to float64 (``label`` as the sites used for this tensor)."""
        got = sorted(masked)
        if got != self.survivors:
            raise SecureSumError(f"secure sum: uploads from {got}, expected the survivors {self.survivors}")
        shape = np.asarray(masked[got[0]]).shape
        total = np.zeros(shape, dtype=np.uint64).reshape(-1)
        for s in got:
            y = np.asarray(masked[s])
            if y.dtype != np.uint64 or y.shape != shape:
                raise SecureSumError(f"secure sum: site {s!r} sent {y.dtype}{list(y.shape)}, expected "
                                     f"uint64{list(shape)}")
            total = total + y.reshape(-1)
        for seed, sign in self._corrections:
            m = mask(seed, label, total.size)
            total = total + m if sign > 0 else total - m
        return decode(total.reshape(shape))
