"""Federation errors that diagnose themselves (issue 12, items 3 and 4).

A plan edited at the centre after the bundles went out, and certificates that do not belong to
the site, its key or the federation: each is named in one line, within seconds, without a
traceback or gRPC's own log lines. Real OpenFL processes on 127.0.0.1 with the federation's own
certificates (helpers from ``test_openfl_federation``).
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest
import yaml

from test_openfl_federation import SITES, TINY, Processes, cli, make_federation

pytestmark = pytest.mark.openfl


def said(result) -> str:
    """A command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def one_error(result) -> bool:
    """Exactly one ``error:`` line and no traceback."""
    lines = result.output.splitlines()
    return sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in result.output


def _start(ws: Path, site: str, *extra) -> "object":
    return cli("collaborator", "start", ws / "bundles" / site, "--name", site, "--connect-timeout", 20,
               "--call-timeout", 5, *extra)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One certified federation shared by the certificate tests (each works on copies)."""
    return make_federation(tmp_path_factory.mktemp("fed"), "fedavg", TINY)


def _copy(ws: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "ws"
    shutil.copytree(ws, target)
    return target


# ---- item 4: certificates ---------------------------------------------------------------------
def test_another_sites_certificate_is_refused_locally_and_copied_nowhere(federation: Path, tmp_path: Path) -> None:
    ws = _copy(federation, tmp_path)
    own = ws / "bundles/site-a/cert/client/col_site-a.crt"
    assert not own.exists()  # the signed certificate has not been handed to the site yet
    started = time.monotonic()
    result = _start(ws, "site-a", "--certificate", ws / "certified/col_site-b.crt")
    elapsed = time.monotonic() - started
    assert result.exit_code == 1, result.output
    assert "certificate check" in said(result) and "'site-b', not of 'site-a'" in said(result)
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert elapsed < 5, elapsed  # no connection was attempted
    assert not own.exists()
    # the right certificate is taken; afterwards another one needs --force
    (ws / "certified/col_site-a.crt").read_bytes()
    from fedfair_med.runtime.openfl.workspace import check_site_credentials

    bundle = ws / "bundles/site-a"
    check_site_credentials(bundle, "site-a", ws / "certified/col_site-a.crt")  # imports, warm-up
    started = time.perf_counter()
    check_site_credentials(bundle, "site-a", ws / "certified/col_site-a.crt")  # every check passes
    assert time.perf_counter() - started < 1.0
    import shutil

    shutil.copyfile(ws / "certified/col_site-a.crt", own)
    other = make_federation(tmp_path / "other", "fedavg", TINY)
    foreign = other / "certified/col_site-a.crt"  # the right name, another federation's CA
    before = own.read_bytes()
    result = _start(ws, "site-a", "--certificate", foreign)
    assert result.exit_code == 1 and "not signed by this federation's certificate authority" in said(result)
    assert own.read_bytes() == before


def test_a_key_made_again_after_signing_is_refused_and_never_silently_replaced(federation: Path,
                                                                               tmp_path: Path) -> None:
    ws = _copy(federation, tmp_path)
    bundle = ws / "bundles/site-a"
    key = bundle / "cert/client/col_site-a.key"
    signed = ws / "certified/col_site-a.crt"
    import shutil

    shutil.copyfile(signed, bundle / "cert/client/col_site-a.crt")
    original = key.read_bytes()
    result = cli("collaborator", "setup", ws / "bundles/site-a.zip", "--name", "site-a")
    assert result.exit_code == 1 and "already exists" in said(result) and "--force" in said(result)
    assert key.read_bytes() == original and (bundle / "cert/client/col_site-a.crt").exists()
    # --force makes a new key and drops the certificate that no longer matches it
    result = cli("collaborator", "setup", ws / "bundles/site-a.zip", "--name", "site-a", "--force")
    assert result.exit_code == 0, result.output
    assert key.read_bytes() != original and not (bundle / "cert/client/col_site-a.crt").exists()
    # the old signed certificate no longer matches the new key: named before connecting
    started = time.monotonic()
    result = _start(ws, "site-a", "--certificate", signed)
    assert result.exit_code == 1, result.output
    assert "does not match this site's private key" in said(result) and "Traceback" not in result.output
    assert time.monotonic() - started < 5


def test_a_garbled_key_or_certificate_is_named_without_grpc_noise(federation: Path, tmp_path: Path) -> None:
    ws = _copy(federation, tmp_path)
    bundle = ws / "bundles/site-c"
    (tmp_path / "junk.crt").write_text("not a certificate\n")
    result = _start(ws, "site-c", "--certificate", tmp_path / "junk.crt")
    assert result.exit_code == 1 and "not a PEM certificate" in said(result)
    import shutil

    shutil.copyfile(ws / "certified/col_site-c.crt", bundle / "cert/client/col_site-c.crt")
    (bundle / "cert/client/col_site-c.key").write_text("-----BEGIN RSA PRIVATE KEY-----\nAAAA\n"
                                                       "-----END RSA PRIVATE KEY-----\n")
    result = _start(ws, "site-c")
    assert result.exit_code == 1 and "not a readable private key" in said(result), result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "Invalid private key" not in result.output and "Traceback" not in result.output


# ---- item 3: a plan edited at the centre after the bundles went out --------------------------
#: A line of gRPC's C core (absl format, e.g. ``E0000 00:00:… ssl_transport_security.cc…``).
GRPC_LOG_LINE = re.compile(r"^[EWI]\d{4} \d\d:\d\d:|\.cc:\d+\]", re.M)


def _impostor(ws: Path, tmp_path: Path) -> Path:
    """site-a's bundle with a certificate and CA chain from another authority (consistent locally)."""
    import shutil

    from cryptography import x509
    from openfl.cryptography.ca import sign_certificate

    from fedfair_med.runtime.openfl.workspace import _cert_pem, _signing_ca, create_certificate_authority

    chain = create_certificate_authority(tmp_path / "foreign")
    bundle = tmp_path / "impostor"
    shutil.copytree(ws / "bundles/site-a", bundle)
    csr = x509.load_pem_x509_csr((bundle / "cert/client/col_site-a.csr").read_bytes())
    signing_key, signing_cert = _signing_ca(tmp_path / "foreign")
    (bundle / "cert/client/col_site-a.crt").write_bytes(
        _cert_pem(sign_certificate(csr, signing_key, signing_cert.subject)))
    shutil.copyfile(chain, bundle / "cert/cert_chain.crt")
    return bundle


def test_a_plan_edited_at_the_centre_is_named_by_both_sides_within_seconds(federation: Path,
                                                                           tmp_path: Path) -> None:
    ws = _copy(federation, tmp_path)
    import shutil

    for site in SITES:
        shutil.copyfile(ws / "certified" / f"col_{site}.crt", ws / "bundles" / site / f"cert/client/col_{site}.crt")
    plan_path = ws / "plan/plan.yaml"
    plan = yaml.safe_load(plan_path.read_text())
    plan["fedfair"]["settings"]["spec"]["run"]["lr"] = 0.01  # edited after the bundles went out
    plan_path.write_text(yaml.safe_dump(plan, sort_keys=False))
    with Processes(tmp_path) as procs:
        started = time.monotonic()
        procs.start("aggregator", "aggregator", "start", "--workspace", ws, "--timeout", 120)
        deadline = time.monotonic() + 120
        while "were issued" not in procs.log("aggregator"):  # said before it serves
            assert time.monotonic() < deadline and procs.procs["aggregator"].poll() is None, procs.log("aggregator")
            time.sleep(0.1)
        assert "changed after the bundles of site-a, site-b, site-c were issued" in " ".join(
            procs.log("aggregator").split())
        port = plan["network"]["settings"]["agg_port"]
        deadline = time.monotonic() + 150  # building the aggregation is slow on a busy machine
        while True:  # the aggregator builds its aggregation, then listens
            assert time.monotonic() < deadline and procs.procs["aggregator"].poll() is None, procs.log("aggregator")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        # an impostor whose certificate and CA chain agree locally: the TLS handshake fails, and
        # neither side's console shows gRPC's own log lines
        impostor = _impostor(ws, tmp_path)
        procs.start("impostor", "collaborator", "start", impostor, "--name", "site-a", "--connect-timeout", 3)
        assert procs.wait("impostor", 60) == 1
        said_impostor = procs.log("impostor").strip()
        assert said_impostor.startswith("error: no answer from the aggregator"), said_impostor
        assert len(said_impostor.splitlines()) == 1, said_impostor
        for site in SITES:
            before = time.monotonic()
            result = _start(ws, site)
            assert result.exit_code == 1, result.output
            assert "the aggregator runs another plan" in said(result) and "changed at the centre" in said(result)
            assert one_error(result) and "site-" not in result.output.split("error:")[0]  # before data
            assert time.monotonic() - before < 10
        rc = procs.wait("aggregator", 30)
        log = " ".join(procs.log("aggregator").split())
    assert rc == 1, log
    assert "site 'site-a' holds another plan" in log and "plan mismatch: every site" in log
    assert "Traceback" not in log and "no site reported" not in log
    assert not GRPC_LOG_LINE.search(procs.log("aggregator")) and "andshake" not in log
    assert time.monotonic() - started < 300
    # a site whose own bundle plan was edited is told before it connects
    bundle_plan = ws / "bundles/site-a/plan/plan.yaml"
    bundle_plan.write_text(bundle_plan.read_text() + "\n# edited\n")
    result = _start(ws, "site-a")
    assert result.exit_code == 1 and "changed after the coordinating centre issued this bundle" in said(result)


# ---- item 5: plans that OpenFL would fail on with a traceback ----------------------------------
def test_a_plan_with_a_misspelt_class_or_key_is_refused_in_one_line(federation: Path, tmp_path: Path) -> None:
    ws = _copy(federation, tmp_path)
    plan_path = ws / "plan/plan.yaml"
    original = yaml.safe_load(plan_path.read_text())

    def edited(change) -> dict:
        plan = yaml.safe_load(yaml.safe_dump(original))
        change(plan)
        return plan

    def typo(plan: dict) -> None:
        policy = plan["straggler_handling_policy"]
        policy["template"] = policy["template"].replace("WaitForAllPolicy", "WaitForAlPolicy")

    cases = [
        (typo, "has no class 'WaitForAlPolicy'; did you mean 'WaitForAllPolicy'?"),
        (lambda p: p["fedfair"]["settings"]["spec"]["run"].update(lamda=2.0),
         "fedfair.settings.spec.run: unknown configuration key(s) ['lamda']"),
        (lambda p: p["aggregator"]["settings"].update(rounds_too_train=3),
         "OpenFL cannot build the aggregator from this plan"),
    ]
    for change, message in cases:
        plan_path.write_text(yaml.safe_dump(edited(change), sort_keys=False))
        result = cli("aggregator", "start", "--workspace", ws, "--timeout", 5, "--idle-timeout", 5)
        assert result.exit_code == 1 and message in said(result), (message, result.output)
        assert one_error(result)
