"""Secure aggregation for the OpenFL runtime: sites mask, the aggregator only ever sums.

With ``--secure-aggregation`` (plan: ``spec.secure_aggregation: true``) a site sends, instead of
its weights θ_s and its method extras e_s,

    y_s = mask_s(n_s · θ_s)  and  mask_s(e_s)     (uint64, :mod:`fedfair_med.privacy.secure_sum`)

plus, in the clear, n_s and the round's mean loss and step count (which the run records per
site). The aggregator adds the masked tensors of *all* sites — the masks cancel only then — and
decodes Σ_s n_s θ_s and Σ_s e_s. A method whose server hook needs nothing else can aggregate from
one pseudo-update ``{state: Σ n_s θ_s / N, num_samples: N, extras: Σ e_s}``: FedAvg and the
methods that reuse its averaging (FedProx, Fair Mixup, DynamicFL), FlexFair (whose server
only pools group sums and counts) and SCAFFOLD (its server step needs Σ n_s (y_s − x) = Σ n_s y_s
− N x and Σ Δc_s; each c_s stays at its site). FedNova (Σ n_s a_s and Σ (n_s / a_s)(w_s − w_g)
are sums, but of products the site would have to form itself — not done) and FairFed (per-site
fairness weights) are refused at ``init-federation``. Integer buffers (BatchNorm's step counters — local step counts, which the
round's ``steps`` extra reveals anyway) travel in the clear and the first site's is kept, as in
plain aggregation.

Keys: ``collaborator setup`` makes the site's long-term X25519 key (kept:
``cert/client/secagg_SITE.key``) and its public key (sent with the certificate request:
``col_SITE.secagg.pub``); ``certify`` publishes every certified site's public key in the initial
server state (``save/init.pbuf``), so each site receives its peers' public keys with the first model.

Drop-outs (plans with ``schedule.secure``; threshold t = ``spec.secure_threshold``). Every masked
OpenFL round runs three steps, all inside the one OpenFL round:

1. ``fedfair_secagg_keys`` — each site makes a fresh round key (:class:`RoundKeys`), sends its
   public half and the t-of-n Shamir shares of its private half, each encrypted to one peer with
   the pairwise channel key of the long-term keys. The aggregator relays them all
   (:data:`RELAY`: one tensor every site fetches) once every site sent them, or once the straggler
   timeout passed after the first did and at least t did (the masking set U1).
2. the masked task (``fedfair_train`` / ``fedfair_statistics``) masks against U1's round keys.
3. ``fedfair_secagg_unmask`` — the aggregator names the survivors U2 (the sites of U1 whose masked
   upload arrived in the same way: all of them, or ≥ t after the timeout; :data:`SURVIVORS`); each
   survivor reveals the shares it holds of the *dropped* sites' round keys; the aggregator rebuilds
   those keys and removes their masks (:class:`~fedfair_med.privacy.secure_sum.Unmasker`).

Fewer than t at either step fails the run in one line naming the missing sites. Sites fetch
:data:`RELAY` / :data:`SURVIVORS` by polling; the aggregator answers an empty tensor until the
step is decided (:class:`DropoutGate`), so no gRPC worker is held while a site waits.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from fedfair_med.contracts import ClientUpdate, StateDict
from fedfair_med.privacy.secure_sum import (
    RoundKeys, SecureSumError, SecureSumParty, Unmasker, generate_keypair, unmask_sum,
)

#: Methods whose server hook depends on the sites only through Σ n_s θ_s and Σ extras.
SECURE_METHODS = ("fedavg", "fedprox", "fairmixup", "dynamicfl", "flexfair", "scaffold")
#: Why the other methods cannot run under secure aggregation (shown at init-federation).
REFUSED = {
    "fednova": "FedNova weights each site's update by n_s / a_s, its own step normaliser (its sums "
               "are of site-side products, which the sites do not send)",
    "fairfed": "FairFed reweights each site by its own fairness gap (needs per-site statistics)",
    "fedavgm": "FedAvgM's server step needs only the sum, but it has not been checked on the "
               "masked path yet",
}
#: Extras that stay in the clear (the run records them per site).
CLEAR_EXTRAS = ("loss", "steps")
SECURE_PREFIX = "extra/secure/"
PUBLIC_KEY_PREFIX = "secagg.public_key/"
PSEUDO_SITE = "__secure_sum__"
#: What the aggregator serves during a masked round (tag :data:`SECAGG_TAG`; not OpenFL's "secagg").
RELAY, SURVIVORS, SECAGG_TAG = "fedfair.secagg.relay", "fedfair.secagg.survivors", "fedfair_secagg"
SECAGG_WIRE = (RELAY, SURVIVORS)
#: Names inside a site's packed task outputs: its round public key, its encrypted shares (one per
#: peer) and, at unmasking, the shares it reveals of dropped sites' keys.
ROUND_PUBLIC, SHARE_PREFIX, REVEAL_PREFIX = "secagg/public", "secagg/share/", "secagg/reveal/"
#: Test-only: ``FEDFAIR_TEST_EXIT_BEFORE_UPLOAD=SITE[@OPENFL_ROUND]`` makes that collaborator exit
#: after it received the round's keys and trained, before it uploads (a drop-out, on purpose).
TEST_EXIT_ENV = "FEDFAIR_TEST_EXIT_BEFORE_UPLOAD"


def method_problem(method: str) -> str | None:
    """Why ``method`` cannot run with secure aggregation (None: it can)."""
    if method in SECURE_METHODS:
        return None
    return REFUSED.get(method, f"method {method!r} is not known to aggregate from sums only")


def threshold(spec: Mapping[str, Any]) -> int:
    """t of the plan (older plans without one: every site, i.e. no drop-out tolerated)."""
    return int(spec.get("secure_threshold") or len(spec["sites"]))


def round_label(fl_round: int) -> str:
    return f"openfl round {int(fl_round)}"


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

    from fedfair_med.runtime.openfl.wire import (
        SERVER_STATE, LosslessPipeline, pack_state, unpack_state,
    )

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
                  extra_dtypes: Mapping[str, torch.dtype] | None = None,
                  unmasker: Unmasker | None = None, label: str = "") -> ClientUpdate:
    """One pseudo-update from every site's masked tensors: only their sums are ever decoded.

    ``rows_by_site[s]`` maps wire names to what site s sent; ``model_state`` gives the model's
    names and dtypes (None in a statistics phase). With an ``unmasker`` (a round with
    drop-out recovery) ``sites`` are its survivors and ``label`` is ``"<OpenFL round>|<task>"``,
    the prefix the sites masked each tensor's label with.
    """
    reported = sorted(rows_by_site)
    if reported != sorted(sites):
        missing = sorted(set(sites) - set(reported))
        raise SecureSumError(f"secure aggregation: site(s) {missing} did not report; the masks of "
                             "the others do not cancel without them, so this round cannot be aggregated")
    total = int(sum(int(num_samples[s]) for s in reported))

    def decoded(name: str) -> np.ndarray:
        if unmasker is not None:
            kind = "extra" if name.startswith(SECURE_PREFIX) else "model"
            tensor = name[len(SECURE_PREFIX):] if kind == "extra" else name
            return unmasker.sum({s: rows_by_site[s][name] for s in reported}, f"{label}|{kind}|{tensor}")
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


# ---- drop-out tolerance: the site's side ---------------------------------------------------
def make_round_keys(spec: Mapping[str, Any], site: str, bundle: Path,
                    server_state: Mapping[str, torch.Tensor], fl_round: int) -> RoundKeys:
    """A fresh round key for this site, its shares encrypted to each peer."""
    publics, _ = split_public_keys(server_state)
    private = read_hex_key(private_key_path(bundle, site), "key-agreement private key")
    return RoundKeys(site, spec["sites"], threshold(spec), private, publics, federation_context(spec),
                     round_label(fl_round))


def keys_message(keys: RoundKeys) -> dict[str, np.ndarray]:
    """What the key step sends: the round public key and one encrypted share per peer."""
    out = {ROUND_PUBLIC: np.frombuffer(keys.public, dtype=np.uint8).copy()}
    out.update({SHARE_PREFIX + peer: np.frombuffer(ct, dtype=np.uint8).copy()
                for peer, ct in keys.encrypted.items()})
    return out


def read_relay(relay: np.ndarray, site: str) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(round public keys of the masking set, the shares encrypted *to* ``site`` by sender)."""
    from fedfair_med.runtime.openfl.wire import unpack_arrays

    publics: dict[str, bytes] = {}
    to_me: dict[str, bytes] = {}
    for (name, _), value in unpack_arrays(relay).items():
        kind, sender, *rest = name.split("|")
        if kind == "public":
            publics[sender] = value.tobytes()
        elif kind == "share" and rest == [site]:
            to_me[sender] = value.tobytes()
    return publics, to_me


def read_decision(array: np.ndarray) -> dict[str, list[str]]:
    """The aggregator's decision for the unmasking step: masking set, survivors, dropped."""
    return json.loads(np.asarray(array, dtype=np.uint8).tobytes())


def exit_if_told(site: str, fl_round: int) -> None:
    """The test-only drop-out hook (:data:`TEST_EXIT_ENV`)."""
    import os

    for item in filter(None, os.environ.get(TEST_EXIT_ENV, "").split(",")):
        name, _, at = item.partition("@")
        if name == site and (not at or int(at) == int(fl_round)):
            os._exit(17)


# ---- drop-out tolerance: the aggregator's side ---------------------------------------------
class DropoutGate:
    """Decides when a step of a masked round goes on, and with which sites.

    A step waits for every expected site; with a straggler timeout it goes on without the silent
    ones once the timeout has passed since the first site asked, if at least t sites are in —
    fewer is a :class:`SecureSumError` naming the missing sites. Without a timeout it waits for all.
    ``patient`` (the key step): the timeout only starts once t sites are in, and below t it keeps
    waiting — sites start up at different speeds, and nothing is lost by waiting before masking.
    """

    def __init__(self, sites: Sequence[str], t: int, cutoff_s: float | None) -> None:
        self.sites, self.threshold, self.cutoff_s = sorted(sites), int(t), cutoff_s
        self._first: dict[tuple[str, int], float] = {}

    def decide(self, step: str, fl_round: int, done: Sequence[str], expected: Sequence[str],
               now: float, patient: bool = False) -> list[str] | None:
        done = sorted(set(done) & set(expected))
        if set(expected) <= set(done):
            return done
        if patient and len(done) < self.threshold:
            return None
        first = self._first.setdefault((step, int(fl_round)), now)
        if self.cutoff_s is None or now - first < float(self.cutoff_s):
            return None
        if len(done) < self.threshold:
            missing = sorted(set(self.sites) - set(done))
            raise SecureSumError(
                f"secure aggregation: OpenFL round {fl_round}: only {len(done)} of {len(self.sites)} "
                f"sites {step} within the {self.cutoff_s:g} s straggler timeout, fewer than the "
                f"threshold {self.threshold}; missing: {', '.join(missing)}")
        return done


def build_relay(messages: Mapping[str, Mapping[str, np.ndarray]]) -> np.ndarray:
    """One tensor with every masking site's round public key and encrypted shares."""
    from fedfair_med.runtime.openfl.wire import pack_arrays

    arrays: dict[tuple[str, str], np.ndarray] = {}
    for sender in sorted(messages):
        for name, value in messages[sender].items():
            if name == ROUND_PUBLIC:
                arrays[(f"public|{sender}", SECAGG_TAG)] = value
            elif name.startswith(SHARE_PREFIX):
                arrays[(f"share|{sender}|{name[len(SHARE_PREFIX):]}", SECAGG_TAG)] = value
    return pack_arrays(arrays)


def build_decision(masking: Sequence[str], survivors: Sequence[str]) -> np.ndarray:
    text = json.dumps({"masking": sorted(masking), "survivors": sorted(survivors),
                       "dropped": sorted(set(masking) - set(survivors))})
    return np.frombuffer(text.encode(), dtype=np.uint8).copy()


def round_unmasker(spec: Mapping[str, Any], fl_round: int, relay: np.ndarray, decision: Mapping[str, list],
                   revealed: Mapping[str, Mapping[str, np.ndarray]]) -> Unmasker:
    """The aggregator's Unmasker for one masked round: reveals ``{survivor: {dropped: share}}``."""
    publics, _ = read_relay(relay, "")
    shares = {j: {d: np.asarray(v, dtype=np.uint8).tobytes() for d, v in by_dropped.items()}
              for j, by_dropped in revealed.items()}
    return Unmasker(spec["sites"], threshold(spec), publics, decision["survivors"], shares,
                    federation_context(spec), round_label(fl_round))
