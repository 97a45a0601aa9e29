"""Cost of drop-out tolerant secure aggregation per round, against plain aggregation.

Secure aggregation (``--secure-aggregation``; privacy/secure_sum.py, runtime/openfl/secure.py)
adds arithmetic at every site and at the aggregator, and a key step and an unmasking step to
every masked OpenFL round. This script times the arithmetic in-process — the same functions the
runtime calls, without processes or network — for a model of P float parameters and n sites:

* plain: the aggregator's weighted sum Σ n_s θ_s over n float64 arrays (what plain FedAvg adds);
* site masking: fixed-point encoding plus n − 1 ChaCha20 mask expansions of P words (per site);
* aggregator sum: Σ of n masked uint64 arrays and the decoding (no drop-out);
* key step: a fresh X25519 key, its Shamir split t of n and n − 1 share encryptions (per site);
* recovery with one drop-out: the survivors' share decryptions, the dropped key's reconstruction
  and the (n − 1) mask expansions the aggregator removes.

Bytes: a masked upload is P × 8 bytes (uint64) against P × 4 for plain float32 weights; the key
step sends 32 + (n − 1) × 82 bytes per site, and the relay all sites' key messages to each site.

    python benchmarks/secure_aggregation.py            # P = fundus UNet (207 128), n = 3, 8, 16
    python benchmarks/secure_aggregation.py --quick    # P = 10 000, n = 3, one repeat, no file
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

import _common as bench

from fedfair_med.privacy import shamir
from fedfair_med.privacy.secure_sum import (
    RoundKeys, Unmasker, decode, default_threshold, generate_keypair, unmask_sum,
)

#: Float parameters of the fundus segmentation UNet (the largest model of the shipped tasks).
FUNDUS_PARAMS = 207_128
CONTEXT, LABEL = "benchmark", "openfl round 0"


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def measure(params: int, n: int, repeats: int) -> dict[str, Any]:
    sites = [f"site-{i:02d}" for i in range(n)]
    t = default_threshold(n)
    rng = np.random.default_rng(n)
    values = {s: rng.normal(scale=0.1, size=params) for s in sites}
    longterm = {s: generate_keypair() for s in sites}
    publics = {s: pub for s, (_, pub) in longterm.items()}

    def key_step(site: str) -> RoundKeys:
        return RoundKeys(site, sites, t, longterm[site][0], publics, CONTEXT, LABEL)

    keys = {s: key_step(s) for s in sites}
    round_publics = {s: k.public for s, k in keys.items()}
    parties = {s: keys[s].party(round_publics) for s in sites}
    masked = {s: parties[s].mask(values[s], "model|all") for s in sites}
    out: dict[str, Any] = {"sites": n, "threshold": t, "params": params}

    out["plain_sum_s"] = _median_s(lambda: sum(values[s] * 10.0 for s in sites), repeats)
    out["site_mask_s"] = _median_s(lambda: parties[sites[0]].mask(values[sites[0]], "model|all"), repeats)
    out["aggregator_sum_s"] = _median_s(lambda: unmask_sum(masked, sites), repeats)
    out["site_key_step_s"] = _median_s(lambda: key_step(sites[0]), repeats)

    dropped, survivors = sites[-1], sites[:-1]
    kept = {s: masked[s] for s in survivors}

    def reveal() -> dict[str, dict[str, bytes]]:
        return {j: keys[j].reveal([dropped], {dropped: keys[dropped].encrypted[j]}, survivors)
                for j in survivors}

    revealed = reveal()
    out["site_reveal_s"] = _median_s(lambda: keys[survivors[0]].reveal(
        [dropped], {dropped: keys[dropped].encrypted[survivors[0]]}, survivors), repeats)

    def recover() -> np.ndarray:
        return Unmasker(sites, t, round_publics, survivors, revealed, CONTEXT, LABEL).sum(kept, "model|all")

    out["aggregator_recovery_1_dropout_s"] = _median_s(recover, repeats)
    total = recover()
    plain = sum(values[s] for s in survivors)
    out["max_abs_error_vs_plain_sum"] = float(np.max(np.abs(total - plain)))
    out["shamir_combine_s"] = _median_s(
        lambda: shamir.combine_bytes({shamir_x: v for shamir_x, v in
                                      shamir.split_bytes(bytes(32), t, n).items()}, t), repeats)
    share_bytes = len(next(iter(keys[sites[0]].encrypted.values())))
    out["bytes"] = {
        "plain_upload_float32": params * 4,
        "masked_upload_uint64": params * 8,
        "key_step_per_site": 32 + (n - 1) * share_bytes,
        "relay_to_each_site": n * (32 + (n - 1) * share_bytes),
        "reveal_per_survivor_per_dropout": shamir.SHARE_BYTES,
    }
    # per round: every site masks (in parallel at the sites), the aggregator sums once
    out["aggregator_overhead_vs_plain"] = out["aggregator_sum_s"] / out["plain_sum_s"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = bench.parser(__doc__.splitlines()[0])
    p.add_argument("--params", type=int, default=None, help="float parameters of the model")
    args = p.parse_args(argv)
    bench.set_threads(args.threads)
    params = args.params or (10_000 if args.quick else FUNDUS_PARAMS)
    counts = [3] if args.quick else [3, 8, 16]
    repeats = args.repeats or (1 if args.quick else 5)
    started = time.perf_counter()
    rows = [measure(params, n, repeats) for n in counts]
    payload = {"benchmark": "secure_aggregation", "quick": args.quick, "machine": bench.machine(argv),
               "setup": {"params": params, "sites": counts, "repeats": repeats,
                         "threshold": "smallest majority", "fraction_bits": 24},
               "results": rows, "wall_s": round(time.perf_counter() - started, 1)}
    bench.print_table(
        f"secure aggregation per round, P = {params} float parameters (median of {repeats})",
        ["n", "t", "plain sum ms", "site mask ms", "aggr. sum ms", "key step ms", "reveal ms",
         "recovery (1 drop) ms", "max |err|", "relay B/site"],
        [[r["sites"], r["threshold"], *(f"{1000 * r[k]:.2f}" for k in (
            "plain_sum_s", "site_mask_s", "aggregator_sum_s", "site_key_step_s", "site_reveal_s",
            "aggregator_recovery_1_dropout_s")),
          f"{r['max_abs_error_vs_plain_sum']:.2e}", r["bytes"]["relay_to_each_site"]] for r in rows])
    if not args.quick:
        print(bench.write_result("secure_aggregation", payload, args.out))
    return payload


if __name__ == "__main__":
    main()
