"""Render a federation's OpenFL workspace from a method's plan template, and run its PKI.

``init_federation`` resolves a :class:`RunConfig` (template defaults < ``--config`` file < flags),
validates it, fixes what every party must agree on — sites, the group vocabularies the
fixed-size summaries use, the phase schedule — and writes::

    workspaces/NAME/
      plan/plan.yaml, plan/cols.yaml   rendered plan (its hash is the federation id)
      save/init.pbuf                   round-0 model + initial server state
      cert/                            certificate authority, the aggregator's key and certificate
      bundles/<site>/ and <site>.zip   what each hospital receives: plan, CA chain, its name
      certified/                       signed site certificates, to send back

The PKI is OpenFL's own offline flow (``fx workspace certify`` / ``fx aggregator certify`` /
``fx collaborator generate-cert-request`` / ``certify``) called as the Python functions those
commands use, so a hospital never types ``fx``: a root CA signs a signing CA, which signs the
aggregator's and each site's certificate; only a site's *request* leaves the hospital, never its
key. ``certify_request`` refuses any common name that is not a site of the plan.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
import yaml

from fedfair_med.config import ConfigError, RunConfig, config_from_mapping
from fedfair_med.contracts import age_band
from fedfair_med.runtime.openfl.schedule import EVALUATE, STATISTICS, TRAIN, Schedule
from fedfair_med.runtime.openfl.wire import LosslessPipeline, pack_state
from fedfair_med.runtime.openfl.schedule import SECAGG_KEYS, SECAGG_UNMASK
from fedfair_med.runtime.setup import RunSetup
from fedfair_med.tasks import build_task

PLAN_DIR = Path(str(resources.files("fedfair_med.plans")))  # the repository's plans/ folder
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
SYNTHETIC_TASKS = ("synthetic-seg", "synthetic-cls")


class FederationError(ValueError):
    """A problem with a federation's set-up that the user can fix (one line, no traceback)."""


def available_methods() -> list[str]:
    return sorted(p.stem for p in PLAN_DIR.glob("*.yaml") if not p.stem.startswith("_"))


# ---- plan rendering --------------------------------------------------------------------
def render_template(method: str, **context: Any) -> dict[str, Any]:
    """Render ``plans/<method>.yaml`` (which extends ``_base.yaml``) into a plan mapping."""
    if method not in available_methods():
        raise FederationError(f"no plan template for method {method!r}; choose one of {available_methods()}")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(PLAN_DIR)),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    text = env.get_template(f"{method}.yaml").render(**context)
    return yaml.safe_load(text)


def _vocabularies(config: RunConfig, sites: Sequence[str]) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """(vocabulary per summary attribute, the training group vocabulary, the site attributes).

    Synthetic federations are public and seeded, so the vocabularies are read from them (the same
    way the simulation does). For real tasks they follow the manifest conventions: sex is
    normalised to female/male and age bands come from ``age_edges``. Age itself is never a
    summary attribute (the metrics ignore it, and its values are nearly per-sample).
    """
    task = build_task(config.task)
    if config.task in SYNTHETIC_TASKS:
        federation = task.load_federation(seed=config.seed, **config.data)
        unknown = sorted(set(sites) - set(federation.site_names))
        if unknown:
            raise FederationError(f"{config.task} has sites {federation.site_names}; "
                                  f"unknown site(s) {unknown}")
        attributes = list(config.attributes) if config.attributes is not None else list(federation.attributes)
        vocab = {a: federation.group_vocabulary(a) for a in ["site", *attributes] if a != "age"}
        vocab["site"] = list(sites)
        group_vocabulary = federation.group_vocabulary(config.attribute)
        if config.attribute == "site":
            group_vocabulary = list(sites)
        return vocab, group_vocabulary, attributes
    edges = [float(e) for e in config.age_edges]
    known = {"site": list(sites), "sex": ["female", "male"],
             "age_band": sorted({age_band(v, edges) for v in [*(e - 1 for e in edges), *edges, edges[-1] + 1]})}
    attributes = list(config.attributes) if config.attributes is not None else ["sex", "age", "age_band"]
    vocab = {a: known[a] for a in ["site", *attributes] if a in known}
    if config.attribute not in vocab:
        raise FederationError(f"attribute {config.attribute!r}: no agreed vocabulary for a federation; "
                              f"use one of {sorted(vocab)}")
    return vocab, vocab[config.attribute], attributes


def check_address(host: str, port: int) -> None:
    """The aggregator's address must be usable before anything is written: a port in 1–65535 and
    a host name that resolves here (sites resolve it too; a typo would only show at start-up)."""
    import socket

    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise FederationError(f"--port {port!r}: a port must be an integer between 1 and 65535")
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as err:
        raise FederationError(f"--aggregator-host {host!r} does not resolve ({err}); "
                              "use the name or address sites will connect to") from None


@dataclass
class RenderedPlan:
    plan: dict[str, Any]
    config: RunConfig
    spec: dict[str, Any]


def render_plan(method: str, *, task: str, sites: Sequence[str], host: str = "127.0.0.1",
                port: int = 50051, overrides: Mapping[str, Any] | None = None,
                straggler_cutoff_s: float | None = None, min_sites: int | None = None,
                poll_interval_s: float = 0.2, secure_aggregation: bool = False,
                secure_threshold: int | None = None) -> RenderedPlan:
    """The complete plan for ``method`` with ``overrides`` (RunConfig keys) applied and checked."""
    sites = list(sites)
    duplicated = sorted({s for s in sites if sites.count(s) > 1})
    if duplicated:
        raise FederationError(f"site(s) {duplicated} listed more than once in --sites")
    bad = [s for s in sites if not SITE_NAME.match(s)]
    if bad or len(set(sites)) != len(sites) or len(sites) < 1:
        raise FederationError(f"sites must be distinct names of letters, digits, '-', '_' or '.'; got {sites}")
    check_address(host, port)
    if straggler_cutoff_s is not None and straggler_cutoff_s <= 0:
        raise FederationError("the straggler cutoff must be a positive number of seconds")
    threshold = None
    if secure_aggregation:  # t of n for the masks' key shares (privacy/secure_sum.py)
        from fedfair_med.privacy.secure_sum import default_threshold, threshold_problem

        threshold = default_threshold(len(sites)) if secure_threshold is None else int(secure_threshold)
        problem = threshold_problem(threshold, len(sites))
        if problem is not None:
            raise FederationError(f"--secure-threshold: {problem}")
        if min_sites is None:
            min_sites = threshold
        elif straggler_cutoff_s is not None and int(min_sites) < threshold:
            raise FederationError(f"--min-sites {min_sites} is below the secure-aggregation threshold "
                                  f"{threshold}: a round with fewer sites cannot be unmasked")
    elif secure_threshold is not None:
        raise FederationError("--secure-threshold needs --secure-aggregation")
    min_sites = len(sites) if min_sites is None else int(min_sites)
    if not 1 <= min_sites <= len(sites):
        raise FederationError(f"min-sites must be between 1 and {len(sites)}")
    plan = render_template(method, host=host, port=int(port), sites=sites,
                           straggler_cutoff_s=straggler_cutoff_s, min_sites=min_sites,
                           poll_interval_s=poll_interval_s)
    method_block = plan["fedfair"]["settings"].pop("method")
    raw = {**method_block, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    raw["task"] = task
    raw["runtime"] = "openfl"
    params = dict(method_block.get("method_params") or {})
    params.update((overrides or {}).get("method_params") or {})
    raw["method_params"] = params
    try:
        config = config_from_mapping(raw)
    except ConfigError as err:
        raise FederationError(str(err).replace("\n", " ")) from None
    from fedfair_med.tasks.skin import PREVALENCE_NEEDS_A_NUMBER, prevalence_from_all_sites

    if prevalence_from_all_sites(config.data):
        raise FederationError(PREVALENCE_NEEDS_A_NUMBER)
    if secure_aggregation:
        from fedfair_med.runtime.openfl.secure import method_problem

        problem = method_problem(config.method)
        if problem is not None:
            raise FederationError(f"--secure-aggregation: cannot run {config.method}: {problem}; "
                                  "secure aggregation reveals only sums over all sites")
        if len(sites) < 2:
            raise FederationError("--secure-aggregation needs at least two sites")
    setup = RunSetup.create(config)  # what the aggregator and every collaborator will build
    rounds, algorithm = setup.rounds, setup.algorithm
    state0 = {k: v.detach().clone() for k, v in setup.build_model().state_dict().items()}
    server0 = algorithm.init_server_state(state0, sites)
    statistics = any(algorithm.wants_statistics(r, server0) for r in range(1, rounds + 1))
    schedule = Schedule(rounds, statistics)
    vocab, group_vocab, attributes = _vocabularies(config, sites)
    spec = {"run": config.to_dict(), "sites": sites, "vocabularies": vocab,
            "group_vocabulary": group_vocab, "attributes": attributes,
            "schedule": {"rounds": rounds, "statistics": statistics},
            "secure_aggregation": bool(secure_aggregation)}
    if secure_aggregation:  # drop-out tolerant masked rounds (runtime/openfl/secure.py)
        spec["schedule"]["secure"] = True
        spec["secure_threshold"] = threshold
        spec["secure_cutoff_s"] = straggler_cutoff_s
        for step in (SECAGG_KEYS, SECAGG_UNMASK):
            plan["tasks"][step] = {**copy.deepcopy(plan["tasks"][TRAIN]), "function": step}
    plan["aggregator"]["settings"]["rounds_to_train"] = schedule.openfl_rounds
    plan["aggregator"]["settings"]["spec"] = spec
    plan["assigner"]["settings"]["schedule"] = spec["schedule"]
    for name in (TRAIN, EVALUATE, STATISTICS, *((SECAGG_KEYS, SECAGG_UNMASK) if secure_aggregation else ())):
        plan["tasks"][name]["aggregation_type"]["settings"]["spec"] = spec
    if not statistics:
        plan["tasks"].pop(STATISTICS)
    plan["fedfair"]["settings"]["spec"] = spec
    return RenderedPlan(plan=plan, config=config, spec=spec)


def write_initial_model(rendered: RenderedPlan, path: Path) -> None:
    """``save/init.pbuf``: round-0 weights (seeded as in the simulation) + initial server state."""
    from openfl.protocols import utils

    from fedfair_med.runtime.openfl.wire import MODEL_BLOB, SERVER_STATE, ModelLayout

    setup = RunSetup.create(rendered.config)
    state = {k: v.detach().clone() for k, v in setup.build_model().state_dict().items()}
    tensors = {MODEL_BLOB: ModelLayout(state).pack(state)}
    tensors[SERVER_STATE] = pack_state(setup.algorithm.init_server_state(state, list(rendered.spec["sites"])))
    proto = utils.construct_model_proto(tensors, 0, LosslessPipeline())
    path.parent.mkdir(parents=True, exist_ok=True)
    utils.dump_proto(proto, str(path))


def dump_plan(plan: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(plan), sort_keys=False))


def load_plan(path: Path) -> dict[str, Any]:
    """A rendered plan, checked (:func:`check_plan`) so that a broken one fails here, in one line."""
    if not Path(path).exists():
        raise FederationError(f"{path}: no plan here")
    try:
        plan = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise FederationError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    cols = Path(path).parent / "cols.yaml"
    check_plan(plan, path, yaml.safe_load(cols.read_text()) if cols.exists() else None)
    return plan


def check_plan(plan: Any, path: Path | str = "plan", cols: Any = None) -> None:
    """The parts of a plan every party relies on are present and consistent.

    The federation spec (run configuration, sites, schedule) must be there and valid, the
    network settings complete, and ``cols.yaml`` (when given) must list exactly the spec's sites.
    """
    try:
        spec = plan["fedfair"]["settings"]["spec"]
        network = plan["network"]["settings"]
        host, port = network["agg_addr"], network["agg_port"]
        sites, rounds = list(spec["sites"]), spec["schedule"]["rounds"]
        run = dict(spec["run"])
    except (KeyError, TypeError) as err:
        raise FederationError(f"{path}: not a fedfair-med federation plan (missing {err}); "
                              "render it with init-federation") from None
    if len(set(sites)) != len(sites) or not all(isinstance(s, str) and SITE_NAME.match(s) for s in sites):
        raise FederationError(f"{path}: the plan's sites {sites} are not distinct valid names")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise FederationError(f"{path}: network.settings.agg_port {port!r} is not a port")
    if not isinstance(host, str) or not host:
        raise FederationError(f"{path}: network.settings.agg_addr {host!r} is not a host")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise FederationError(f"{path}: schedule.rounds must be a positive integer, got {rounds!r}")
    try:
        config_from_mapping(run)
    except ConfigError as err:
        raise FederationError(f"{path}: fedfair.settings.spec.run: {str(err).replace(chr(10), ' ')}") from None
    problem = template_problem(plan)
    if problem is not None:
        raise FederationError(f"{path}: {problem}")

    if cols is not None:
        listed = (cols or {}).get("collaborators") if isinstance(cols, dict) else None
        if listed is None or sorted(map(str, listed)) != sorted(sites):
            raise FederationError(f"{Path(path).parent / 'cols.yaml'}: collaborators {listed} do not match "
                                  f"the plan's sites {sites}")


def template_problem(plan: Any, where: str = "") -> str | None:
    """The first ``template`` in the plan naming a class that does not exist, said with a
    suggestion (OpenFL would fail much later, in a long AttributeError traceback)."""
    import difflib
    import importlib

    items = plan.items() if isinstance(plan, dict) else []
    for key, value in items:
        here = f"{where}.{key}" if where else str(key)
        if key == "template" and isinstance(value, str):
            module_name, _, class_name = value.rpartition(".")
            try:
                module = importlib.import_module(module_name)
            except (ImportError, ValueError):
                return f"{here} {value!r}: no module {module_name!r}"
            if not hasattr(module, class_name):
                close = difflib.get_close_matches(class_name, dir(module), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                return f"{here} {value!r}: {module_name} has no class {class_name!r}{hint}"
        elif isinstance(value, dict):
            problem = template_problem(value, here)
            if problem is not None:
                return problem
    return None


def plan_spec(plan: Mapping[str, Any]) -> dict[str, Any]:
    return plan["fedfair"]["settings"]["spec"]


# ---- PKI -------------------------------------------------------------------------------
def _write_pem(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


def _key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(encoding=serialization.Encoding.PEM,
                             format=serialization.PrivateFormat.TraditionalOpenSSL,
                             encryption_algorithm=serialization.NoEncryption())


def _cert_pem(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(encoding=serialization.Encoding.PEM)


def create_certificate_authority(cert_dir: Path) -> Path:
    """Root CA → signing CA → ``cert_chain.crt`` (what ``fx workspace certify`` makes)."""
    from openfl.cryptography.ca import generate_root_cert, generate_signing_csr, sign_certificate

    root_key, root_cert = generate_root_cert()
    signing_key, signing_csr = generate_signing_csr()
    signing_cert = sign_certificate(signing_csr, root_key, root_cert.subject, ca=True)
    _write_pem(cert_dir / "ca/root-ca.crt", _cert_pem(root_cert))
    _write_pem(cert_dir / "ca/root-ca/private/root-ca.key", _key_pem(root_key), private=True)
    _write_pem(cert_dir / "ca/signing-ca.crt", _cert_pem(signing_cert))
    _write_pem(cert_dir / "ca/signing-ca/private/signing-ca.key", _key_pem(signing_key), private=True)
    chain = cert_dir / "cert_chain.crt"
    chain.write_bytes(_cert_pem(root_cert) + _cert_pem(signing_cert))
    return chain


def _signing_ca(cert_dir: Path) -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key_path = cert_dir / "ca/signing-ca/private/signing-ca.key"
    if not key_path.exists():
        raise FederationError(f"{cert_dir}: no certificate authority here (run init-federation first)")
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate((cert_dir / "ca/signing-ca.crt").read_bytes())
    return key, cert


def certify_aggregator(cert_dir: Path, host: str) -> tuple[Path, Path]:
    """The aggregator's key and server certificate, named as OpenFL's plan expects."""
    from openfl.cryptography.ca import sign_certificate
    from openfl.cryptography.participant import generate_csr

    common_name = host.lower()
    key, csr = generate_csr(common_name, server=True)
    signing_key, signing_cert = _signing_ca(cert_dir)
    cert = sign_certificate(csr, signing_key, signing_cert.subject)
    crt_path, key_path = cert_dir / f"server/agg_{common_name}.crt", cert_dir / f"server/agg_{common_name}.key"
    _write_pem(crt_path, _cert_pem(cert))
    _write_pem(key_path, _key_pem(key), private=True)
    return crt_path, key_path


def refuse_new_key(bundle: Path, name: str, force: bool = False) -> None:
    """A site's key is made once: a new one would no longer match its signed certificate.

    With ``force`` the old key and certificate are removed (the new request must be signed)."""
    key_path = Path(bundle) / f"cert/client/col_{name}.key"
    crt_path = key_path.with_suffix(".crt")
    if not key_path.exists():
        return
    if not force:
        signed = " and its signed certificate" if crt_path.exists() else ""
        raise FederationError(f"{key_path} already exists: this site has its key{signed}; a new key "
                              "would no longer match the certificate. Nothing changed; use --force "
                              "to make a new key (then send the new request for signing)")
    key_path.unlink()
    crt_path.unlink(missing_ok=True)


def make_certificate_request(bundle: Path, name: str, force: bool = False) -> Path:
    """At the hospital: a new private key (kept) and a certificate request (to send).

    Refuses to replace an existing key without ``force`` (see :func:`refuse_new_key`)."""
    from cryptography.hazmat.primitives import serialization
    from openfl.cryptography.participant import generate_csr

    refuse_new_key(bundle, name, force)
    key, csr = generate_csr(name, server=False)
    _write_pem(bundle / f"cert/client/col_{name}.key", _key_pem(key), private=True)
    request = bundle / f"cert/client/col_{name}.csr"
    _write_pem(request, csr.public_bytes(serialization.Encoding.PEM))
    return request


def check_site_credentials(bundle: Path, name: str, certificate: Path | None = None) -> None:
    """Key ↔ certificate ↔ site name ↔ the bundle's CA, checked locally in milliseconds.

    Each failure is one line naming the check that failed, instead of a TLS handshake that fails
    somewhere else (the aggregator closes the connection; the site only sees silence).
    ``certificate`` (default: the bundle's own) is checked before it is copied anywhere.
    """
    import datetime

    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    bundle = Path(bundle)
    key_path = bundle / f"cert/client/col_{name}.key"
    crt_path = Path(certificate) if certificate is not None else bundle / f"cert/client/col_{name}.crt"
    chain_path = bundle / "cert/cert_chain.crt"
    if not key_path.exists():
        raise FederationError(f"{key_path} is missing: run `collaborator setup` first")
    if not crt_path.exists():
        hint = ("no such file" if certificate is not None
                else "ask the coordinating centre to certify this site's request, then pass --certificate")
        raise FederationError(f"{crt_path} is missing: {hint}")
    try:
        cert = x509.load_pem_x509_certificate(crt_path.read_bytes())
    except ValueError:
        raise FederationError(f"certificate check: {crt_path} is not a PEM certificate") from None
    names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [name]:
        raise FederationError(f"certificate check: {crt_path} is the certificate of "
                              f"{', '.join(map(repr, names)) or 'no site'}, not of {name!r}")
    try:
        chain = x509.load_pem_x509_certificates(chain_path.read_bytes())
    except (OSError, ValueError):
        raise FederationError(f"certificate check: {chain_path} (the federation's CA, from the "
                              "bundle) is missing or unreadable; unpack the bundle again") from None
    issuers = [ca for ca in chain if ca.subject == cert.issuer]
    try:
        if not issuers:
            raise InvalidSignature
        cert.verify_directly_issued_by(issuers[0])
    except (InvalidSignature, ValueError, TypeError):
        raise FederationError(f"certificate check: {crt_path} was not signed by this federation's "
                              f"certificate authority ({chain_path}); use the certificate the "
                              "coordinating centre signed for this site") from None
    try:
        # only its public half is compared (RSA's full self-check takes seconds on a busy CPU)
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None,
                                                 unsafe_skip_rsa_key_validation=True)
    except (ValueError, TypeError):
        raise FederationError(f"certificate check: {key_path} is not a readable private key") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.PEM, public)
            != cert.public_key().public_bytes(serialization.Encoding.PEM, public)):
        raise FederationError(f"certificate check: {crt_path} does not match this site's private key "
                              f"{key_path} (was `collaborator setup` run again after the request "
                              "was signed?); have the current request signed")
    now = datetime.datetime.now(datetime.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise FederationError(f"certificate check: {crt_path} is valid only from "
                              f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}")


def request_name(request: Path) -> str:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        csr = x509.load_pem_x509_csr(Path(request).read_bytes())
    except (OSError, ValueError) as err:
        raise FederationError(f"{request}: not a certificate request ({err})") from None
    if not csr.is_signature_valid:
        raise FederationError(f"{request}: the request's signature is invalid")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise FederationError(f"{request}: the request must name exactly one site")
    return str(names[0].value)


def certify_request(workspace: Path, request: Path) -> Path:
    """At the coordinating centre: sign a site's request — only for a site named in the plan."""
    from cryptography import x509
    from openfl.cryptography.ca import sign_certificate

    workspace = Path(workspace)
    sites = plan_spec(load_plan(workspace / "plan/plan.yaml"))["sites"]
    name = request_name(request)
    if name not in sites:
        raise FederationError(f"refusing to certify {name!r}: it is not a site of this federation "
                              f"(sites: {', '.join(sites)})")
    csr = x509.load_pem_x509_csr(Path(request).read_bytes())
    signing_key, signing_cert = _signing_ca(workspace / "cert")
    cert = sign_certificate(csr, signing_key, signing_cert.subject)
    spec = plan_spec(load_plan(workspace / "plan/plan.yaml"))
    if spec.get("secure_aggregation"):
        from fedfair_med.runtime.openfl.secure import publish_public_key, public_key_path, read_hex_key

        pub_path = public_key_path(request, name)
        if not pub_path.exists():
            raise FederationError(f"secure aggregation: {pub_path.name} must come with {Path(request).name} "
                                  "(the site's key-agreement public key, made by `collaborator setup`)")
        public_key = read_hex_key(pub_path, "key-agreement public key")
        publish_public_key(workspace / "save/init.pbuf", name, public_key)
    target = workspace / f"certified/col_{name}.crt"
    _write_pem(target, _cert_pem(cert))
    return target


# ---- the whole workspace ----------------------------------------------------------------
@dataclass
class FederationWorkspace:
    path: Path
    plan: Path
    bundles: dict[str, Path]
    config: RunConfig
    spec: dict[str, Any]


def init_federation(name: str, *, method: str, task: str, sites: Sequence[str],
                    host: str = "127.0.0.1", port: int = 50051,
                    overrides: Mapping[str, Any] | None = None,
                    workspaces_dir: Path = Path("workspaces"),
                    straggler_cutoff_s: float | None = None, min_sites: int | None = None,
                    poll_interval_s: float = 0.2, force: bool = False,
                    secure_aggregation: bool = False, secure_threshold: int | None = None) -> FederationWorkspace:
    if not SITE_NAME.match(name):
        raise FederationError(f"federation name {name!r}: use letters, digits, '-', '_' or '.'")
    root = Path(workspaces_dir) / name
    if root.exists() and any(root.iterdir()):
        if not force:
            raise FederationError(f"{root} already exists; choose another name or remove it")
        shutil.rmtree(root)
    rendered = render_plan(method, task=task, sites=sites, host=host, port=port, overrides=overrides,
                           straggler_cutoff_s=straggler_cutoff_s, min_sites=min_sites,
                           poll_interval_s=poll_interval_s, secure_aggregation=secure_aggregation,
                           secure_threshold=secure_threshold)
    plan_path = root / "plan/plan.yaml"
    dump_plan(rendered.plan, plan_path)
    (root / "plan/cols.yaml").write_text(yaml.safe_dump({"collaborators": list(sites)}))
    (root / "plan/data.yaml").write_text("".join(f"{s},{s}\n" for s in sites))
    write_initial_model(rendered, root / "save/init.pbuf")
    create_certificate_authority(root / "cert")
    certify_aggregator(root / "cert", host)
    from fedfair_med.runtime.openfl.spec import plan_fingerprint

    fingerprint = plan_fingerprint(root / "plan")  # recorded so either side can tell an edited plan
    bundles = {}
    for site in sites:
        bundle = root / "bundles" / site
        for rel in ("plan/plan.yaml", "plan/cols.yaml"):
            (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / rel, bundle / rel)
        (bundle / "cert").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / "cert/cert_chain.crt", bundle / "cert/cert_chain.crt")
        (bundle / "site.json").write_text(json.dumps({"site": site, "federation": name,
                                                      "plan_sha256": fingerprint}, indent=2))
        shutil.make_archive(str(bundle), "zip", root_dir=bundle)
        bundles[site] = bundle
    return FederationWorkspace(root, plan_path, bundles, rendered.config, rendered.spec)


def open_bundle(bundle: Path) -> Path:
    """A bundle directory, unpacking a ``.zip`` next to itself first."""
    bundle = Path(bundle)
    if bundle.suffix == ".zip":
        if not bundle.exists():
            raise FederationError(f"{bundle}: no such bundle")
        target = bundle.with_suffix("")
        shutil.unpack_archive(str(bundle), str(target))
        bundle = target
    if not (bundle / "plan/plan.yaml").exists() or not (bundle / "site.json").exists():
        raise FederationError(f"{bundle}: not a site bundle (no plan/plan.yaml and site.json)")
    return bundle


def check_bundle_plan(bundle: Path) -> None:
    """The bundle's plan is the one the centre issued (``site.json`` records its fingerprint)."""
    from fedfair_med.runtime.openfl.spec import plan_fingerprint

    recorded = json.loads((Path(bundle) / "site.json").read_text()).get("plan_sha256")
    if recorded is not None and recorded != plan_fingerprint(Path(bundle) / "plan"):
        raise FederationError(f"{Path(bundle) / 'plan'}: the plan was changed after the coordinating "
                              "centre issued this bundle; unpack the bundle again (the aggregator "
                              "would refuse this plan)")


def bundle_site(bundle: Path) -> str:
    return json.loads((Path(bundle) / "site.json").read_text())["site"]
