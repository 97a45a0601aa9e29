"""Secure aggregation for the OpenFL runtime: sites mask, the aggregator only ever sums.

With ``--secure-aggregation`` (plan: ``spec.secure_aggregation: true``) a site sends, instead of
its weights θ_s and its method extras e_s,

    y_s = mask_s(n_s · θ_s)  and  mask_s(e_s)     (uint64, :mod:`fedfair_med.privacy.secure_sum`)

plus, in the clear, n_s and the round's mean loss and step count (which the run records per
site). The aggregator adds the masked tensors of *all* sites — the masks cancel only then — and
decodes Σ_s n_s θ_s and Σ_s e_s. A method whose server hook needs nothing else can aggregate from
one pseudo-update ``{state: Σ n_s θ_s / N, num_samples: N, extras: Σ e_s}``: FedAvg and the
methods that reuse its averaging (FedProx, Fair Mixup, DynamicFL) and FlexFair (whose server
only pools group sums and counts). FedNova (per-site normalisers), SCAFFOLD (per-site control
variates) and FairFed (per-site fairness weights) need per-site values and are refused at
``init-federation``. Integer buffers (BatchNorm's step counters — local step counts, which the
round's ``steps`` extra reveals anyway) travel in the clear and the first site's is kept, as in
plain aggregation.

Keys: ``collaborator setup`` makes the site's X25519 key (kept: ``cert/client/secagg_SITE.key``)
and its public key (sent with the certificate request: ``col_SITE.secagg.pub``); ``certify``
publishes every certified site's public key in the initial server state (``save/init.pbuf``), so
each site receives its peers' public keys from the aggregator with the first model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from fedfair_med.algorithms.base import ClientUpdate, StateDict
from fedfair_med.privacy.secure_sum import SecureSumError, SecureSumParty, generate_keypair, unmask_sum

#: Methods whose server hook depends on the sites only through Σ n_s θ_s and Σ extras.
SECURE_METHODS = ("fedavg", "fedprox", "fairmixup", "dynamicfl", "flexfair")
#: Why the other methods cannot run under secure aggregation (shown at init-federation).
REFUSED = {
    "fednova": "FedNova normalises each site's update by its own step count (needs per-site updates)",
    "scaffold": "SCAFFOLD keeps one control variate per site (needs per-site Δc)",
    "fairfed": "FairFed reweights each site by its own fairness gap (needs per-site statistics)",
}
#: Extras that stay in the clear (the run records them per site).
CLEAR_EXTRAS = ("loss", "steps")
SECURE_PREFIX = "extra/secure/"
PUBLIC_KEY_PREFIX = "secagg.public_key/"
PSEUDO_SITE = "__secure_sum__"


def method_problem(method: str) -> str | None:
    """Why ``method`` cannot run with secure aggregation (None: it can)."""
    if method in SECURE_METHODS:
        return None
    return REFUSED.get(method, f"method {method!r} is not known to aggregate from sums only")


def federation_context(spec: Mapping[str, Any]) -> str:
    """What binds the pair seeds to this federation (its run settings and sites)."""
    text = json.dumps({"run": spec["run"], "sites": spec["sites"]}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# ---- keys on disk ------------------------------------------------------------------------
def private_key_path(bundle: Path, site: str) -> Path:
    return Path(bundle) / f"cert/client/secagg_{site}.key"


def public_key_path(request: Path, site: str) -> Path:
    """``col_SITE.secagg.pub`` next to the certificate request ``col_SITE.csr``."""
    return Path(request).parent / f"col_{site}.secagg.pub"


def make_site_keys(bundle: Path, site: str) -> Path:
    """At the hospital: the key-agreement key (kept, mode 600) and its public key (to send)."""
    private, public = generate_keypair()
    key = private_key_path(bundle, site)
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_text(private.hex())
    key.chmod(0o600)
    pub = key.parent / f"col_{site}.secagg.pub"
    pub.write_text(public.hex())
    return pub


def read_hex_key(path: Path, what: str) -> bytes:
    try:
        key = bytes.fromhex(Path(path).read_text().strip())
    except FileNotFoundError:
        raise SecureSumError(f"{path}: no {what} (secure aggregation)") from None
    except ValueError:
        raise SecureSumError(f"{path}: not a {what} (expected 64 hex digits)") from None
    if len(key) != 32:
        raise SecureSumError(f"{path}: not a {what} (expected 32 bytes, got {len(key)})")
    return key


def publish_public_key(init_model: Path, site: str, public_key: bytes) -> None:
    """Add a site's public key to the initial server state in ``save/init.pbuf``."""
    from openfl.protocols import utils

    from fedfair_med.runtime.openfl.protocol import SERVER_STATE, LosslessPipeline, pack_state, unpack_state

    proto = utils.load_proto(str(init_model))
    tensors, _ = utils.deconstruct_model_proto(proto, LosslessPipeline())
    state = unpack_state(tensors[SERVER_STATE])
    state[PUBLIC_KEY_PREFIX + site] = torch.tensor(list(public_key), dtype=torch.uint8)
    tensors[SERVER_STATE] = pack_state(state)
    utils.dump_proto(utils.construct_model_proto(tensors, 0, LosslessPipeline()), str(init_model))


def split_public_keys(server_state: Mapping[str, torch.Tensor]) -> tuple[dict[str, bytes], StateDict]:
    """(public keys by site, the method's own server state without them)."""
    keys = {k[len(PUBLIC_KEY_PREFIX):]: bytes(v.tolist()) for k, v in server_state.items()
            if k.startswith(PUBLIC_KEY_PREFIX)}
    rest = {k: v for k, v in server_state.items() if not k.startswith(PUBLIC_KEY_PREFIX)}
    return keys, rest


def missing_public_keys(server_state: Mapping[str, torch.Tensor], sites: Sequence[str]) -> list[str]:
    keys, _ = split_public_keys(server_state)
    return [s for s in sites if s not in keys]


# ---- the site's side --------------------------------------------------------------------
def make_party(spec: Mapping[str, Any], site: str, bundle: Path,
               server_state: Mapping[str, torch.Tensor]) -> SecureSumParty:
    keys, _ = split_public_keys(server_state)
    private = read_hex_key(private_key_path(bundle, site), "key-agreement private key")
    return SecureSumParty(site, spec["sites"], private, keys, federation_context(spec))


def mask_update(party: SecureSumParty, fl_round: int, phase: str, state: Mapping[str, torch.Tensor] | None,
                num_samples: int, extras: Mapping[str, Any]
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(masked tensors: wire name → uint64, clear integer model buffers, clear extras).

    Float model tensors are weighted by n_s and masked. Integer buffers (BatchNorm's
    ``num_batches_tracked``, a count of local steps, which travel in the clear anyway) are sent
    as they are, so the server can keep the plain rule (the first site's value).
    """
    masked: dict[str, np.ndarray] = {}
    clear_state: dict[str, np.ndarray] = {}
    for name, value in (state or {}).items():
        if not torch.is_floating_point(value):
            clear_state[name] = value.detach().cpu().numpy().copy()
            continue
        x = value.detach().cpu().to(torch.float64).numpy() * float(num_samples)
        masked[name] = party.mask(x, f"{fl_round}|{phase}|model|{name}")
    clear: dict[str, np.ndarray] = {}
    for name, value in extras.items():
        array = torch.as_tensor(value).detach().cpu().numpy()
        if name in CLEAR_EXTRAS:
            clear[name] = array
        else:
            masked[SECURE_PREFIX + name] = party.mask(array.astype(np.float64), f"{fl_round}|{phase}|extra|{name}")
    return masked, clear_state, clear


# ---- the aggregator's side ---------------------------------------------------------------
def summed_update(rows_by_site: Mapping[str, Mapping[str, np.ndarray]], sites: Sequence[str],
                  model_state: Mapping[str, torch.Tensor] | None, num_samples: Mapping[str, int],
                  extra_dtypes: Mapping[str, torch.dtype] | None = None) -> ClientUpdate:
    """One pseudo-update from every site's masked tensors: only their sums are ever decoded.

    ``rows_by_site[s]`` maps wire names to what site s sent; ``model_state`` gives the model's
    names and dtypes (None in a statistics phase).
    """
    reported = sorted(rows_by_site)
    if reported != sorted(sites):
        missing = sorted(set(sites) - set(reported))
        raise SecureSumError(f"secure aggregation: site(s) {missing} did not report; the masks of "
                             "the others do not cancel without them, so this round cannot be aggregated")
    total = int(sum(int(num_samples[s]) for s in reported))

    def decoded(name: str) -> np.ndarray:
        return unmask_sum({s: rows_by_site[s][name] for s in reported}, reported)

    state: StateDict = {}
    for name, like in (model_state or {}).items():
        if not torch.is_floating_point(like):  # a clear step counter: the plain rule
            state[name] = torch.from_numpy(np.array(rows_by_site[reported[0]][name])).to(like.dtype)
            continue
        summed = decoded(name)
        state[name] = torch.from_numpy(np.asarray(summed / total)).to(like.dtype).reshape(like.shape)
    names = sorted({n[len(SECURE_PREFIX):] for s in reported for n in rows_by_site[s]
                    if n.startswith(SECURE_PREFIX)})
    extras = {n: torch.from_numpy(np.asarray(decoded(SECURE_PREFIX + n))).to((extra_dtypes or {}).get(n, torch.float64))
              for n in names}
    return ClientUpdate(state=state, num_samples=total, extras=extras)
