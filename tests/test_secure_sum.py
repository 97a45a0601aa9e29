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


# ---- drop-out recovery: round keys shared t of n --------------------------------------------
def _round(sites, threshold, label="round 0|train", context="fed-1"):
    """Every site's long-term key, then its round keys and encrypted shares (as relayed)."""
    from fedfair_med.privacy.secure_sum import RoundKeys

    longterm = {s: generate_keypair() for s in sites}
    publics = {s: pub for s, (_, pub) in longterm.items()}
    return {s: RoundKeys(s, sites, threshold, longterm[s][0], publics, context, label) for s in sites}


@pytest.mark.parametrize("n,t,dropped", [(3, 2, ["site-c"]), (5, 3, ["s1", "s3"]), (4, 3, ["s0"])])
def test_a_round_with_dropouts_sums_exactly_the_survivors(n, t, dropped) -> None:
    from fedfair_med.privacy.secure_sum import Unmasker

    sites = SITES if n == 3 else [f"s{i}" for i in range(n)]
    keys = _round(sites, t)
    round_publics = {s: k.public for s, k in keys.items()}  # every site advertised, then some dropped
    rng = np.random.default_rng(n)
    values = {s: rng.normal(scale=20.0, size=(6, 4)) for s in sites}
    survivors = [s for s in sites if s not in dropped]
    masked = {s: keys[s].party(round_publics).mask(values[s], "conv.weight") for s in survivors}
    # without recovery the dangling masks make noise of the survivors' sum
    garbage = decode(sum((masked[s] for s in survivors), np.zeros((6, 4), np.uint64)))
    assert np.all(np.abs(garbage - sum(values[s] for s in survivors)) > 1.0)
    revealed = {j: keys[j].reveal(dropped, {d: keys[d].encrypted[j] for d in dropped}, survivors)
                for j in survivors}
    unmasker = Unmasker(sites, t, round_publics, survivors, revealed, "fed-1", "round 0|train")
    total = unmasker.sum(masked, "conv.weight")
    plain = sum(values[s] for s in survivors)
    assert np.max(np.abs(total - plain)) <= len(survivors) * 2.0 ** -(FRACTION_BITS + 1)
    # t revealers are enough: drop the surplus survivors' reveals
    enough = {j: revealed[j] for j in survivors[:t]}
    assert np.allclose(Unmasker(sites, t, round_publics, survivors, enough, "fed-1",
                                "round 0|train").sum(masked, "conv.weight"), total, atol=0)
    # t − 1 revealers are not: the error names the dropped site
    too_few = {j: revealed[j] for j in survivors[: t - 1]}
    with pytest.raises(SecureSumError, match=f"dropped site {dropped[0]}"):
        Unmasker(sites, t, round_publics, survivors, too_few, "fed-1", "round 0|train")


def test_below_the_threshold_the_round_fails_naming_the_missing_sites() -> None:
    from fedfair_med.privacy.secure_sum import Unmasker

    sites = [f"s{i}" for i in range(5)]
    keys = _round(sites, 3)
    round_publics = {s: k.public for s, k in keys.items()}
    survivors = ["s0", "s2"]
    with pytest.raises(SecureSumError, match="missing: s1, s3, s4"):
        Unmasker(sites, 3, round_publics, survivors, {}, "fed-1", "round 0|train")
    # and a survivor refuses to reveal anything when fewer than t remain
    with pytest.raises(SecureSumError, match="threshold"):
        keys["s0"].reveal(["s1", "s3", "s4"], {d: keys[d].encrypted["s0"] for d in ("s1", "s3", "s4")},
                          survivors)


def test_shares_are_bound_to_their_pair_and_round_and_wrong_shares_are_caught() -> None:
    from fedfair_med.privacy.secure_sum import Unmasker, threshold_problem

    keys = _round(SITES, 2)
    a, b, c = SITES
    # b cannot read the share c encrypted for a; a cannot read it as another round's
    with pytest.raises(SecureSumError, match="authenticate"):
        keys[b].reveal([c], {c: keys[c].encrypted[a]}, [a, b])
    other_round = _round(SITES, 2, label="round 1|train")
    with pytest.raises(SecureSumError, match="authenticate"):
        keys[a].reveal([c], {c: other_round[c].encrypted[a]}, [a, b])
    with pytest.raises(SecureSumError, match="both dropped and a survivor"):
        keys[a].reveal([b], {b: keys[b].encrypted[a]}, [a, b])
    # a forged share is caught against the dropped site's round public key
    round_publics = {s: k.public for s, k in keys.items()}
    good = keys[a].reveal([c], {c: keys[c].encrypted[a]}, [a, b])
    forged = {a: good, b: {c: bytes(65) + b"\x07"}}
    with pytest.raises(SecureSumError, match=f"{c}"):
        Unmasker(SITES, 2, round_publics, [a, b], forged, "fed-1", "round 0|train")
    # the threshold rule: n/2 < t ≤ n
    assert threshold_problem(2, 3) is None and threshold_problem(2, 2) is None
    assert threshold_problem(2, 4) and threshold_problem(4, 3) and threshold_problem(1, 1)
