"""The consortium's signature over a run: what a site accepts, and every way it refuses."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.common.serde import user_config_from_proto, user_config_to_proto

from fl_common.appsign import (
    SIGNATURE_KEY,
    SIGNER_KEY,
    AppRejected,
    load_ca,
    load_signing_key,
    sign_run,
    verify_run,
)
from fl_server.certs import make_certificates, renew_app_signing
from fl_server.control import build_fab
from fl_server.launcher import app_pyproject, signature

CONFIG = {"run-dir": "/srv/run", "num-rounds": 3, "min-sites": 2, "resume": False,
          "timeout": 3600.0, "server-dp-delta": 1e-5, "site-nodes": '{"7": "plagh"}'}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    make_certificates(out)
    return out


def _signed(certs: Path, fab_hash: str, config: dict) -> dict:
    key = load_signing_key((certs / "app-signing.key").read_bytes())
    return {**config, **sign_run(key, (certs / "app-signing.crt").read_bytes(), fab_hash, config)}


def test_a_signed_run_is_accepted_after_the_wire(certs: Path) -> None:
    fab, fab_hash = build_fab(app_pyproject())
    signed = _signed(certs, fab_hash, CONFIG)
    received = user_config_from_proto(user_config_to_proto(signed))  # as the site gets it
    signer = verify_run(load_ca((certs / "ca.crt").read_bytes()), fab, fab_hash, received)
    assert "app signing" in signer.subject.rfc4514_string()


@pytest.mark.parametrize("tamper", ["config", "bundle", "signature", "unsigned"])
def test_a_changed_or_unsigned_run_is_refused(certs: Path, tamper: str) -> None:
    fab, fab_hash = build_fab(app_pyproject())
    signed = _signed(certs, fab_hash, CONFIG)
    if tamper == "config":  # e.g. a run that claims more rounds than the centre signed
        signed["num-rounds"] = 4
    elif tamper == "bundle":
        fab = fab + b"\0"
    elif tamper == "signature":
        raw = bytearray(base64.b64decode(signed[SIGNATURE_KEY]))
        raw[0] ^= 1
        signed[SIGNATURE_KEY] = base64.b64encode(bytes(raw)).decode()
    else:
        del signed[SIGNATURE_KEY], signed[SIGNER_KEY]
    with pytest.raises(AppRejected):
        verify_run(load_ca((certs / "ca.crt").read_bytes()), fab, fab_hash, signed)


def test_a_run_signed_by_another_consortium_is_refused(certs: Path, tmp_path: Path) -> None:
    make_certificates(tmp_path / "other")
    fab, fab_hash = build_fab(app_pyproject())
    foreign = _signed(tmp_path / "other", fab_hash, CONFIG)
    with pytest.raises(AppRejected, match="did not certify"):
        verify_run(load_ca((certs / "ca.crt").read_bytes()), fab, fab_hash, foreign)


def test_a_key_without_a_code_signing_certificate_is_refused(certs: Path) -> None:
    """A certificate the CA issued for another purpose (the server's TLS) cannot sign apps;
    nor can a bare key presented with the real signer's certificate."""
    fab, fab_hash = build_fab(app_pyproject())
    ca = load_ca((certs / "ca.crt").read_bytes())
    rogue = ed25519.Ed25519PrivateKey.generate()
    borrowed = {**CONFIG, **sign_run(rogue, (certs / "server.crt").read_bytes(), fab_hash,
                                     CONFIG)}
    with pytest.raises(AppRejected):
        verify_run(ca, fab, fab_hash, borrowed)
    stolen_name = {**CONFIG, **sign_run(rogue, (certs / "app-signing.crt").read_bytes(),
                                        fab_hash, CONFIG)}
    with pytest.raises(AppRejected, match="does not match"):
        verify_run(ca, fab, fab_hash, stolen_name)


def test_a_renewed_signing_key_is_accepted_with_the_same_ca(tmp_path: Path) -> None:
    make_certificates(tmp_path)
    ca_before = (tmp_path / "ca.crt").read_bytes()
    key_before = (tmp_path / "app-signing.key").read_bytes()
    renew_app_signing(tmp_path)
    assert (tmp_path / "ca.crt").read_bytes() == ca_before
    assert (tmp_path / "app-signing.key").read_bytes() != key_before
    fab, fab_hash = build_fab(app_pyproject())
    verify_run(load_ca(ca_before), fab, fab_hash, _signed(tmp_path, fab_hash, CONFIG))


def test_a_certs_folder_from_before_app_signing_needs_nothing_new(tmp_path: Path) -> None:
    make_certificates(tmp_path)
    for name in ("app-signing.crt", "app-signing.key"):
        (tmp_path / name).unlink()  # today's layout without app signing: ca, server, sites
    fab, fab_hash = build_fab(app_pyproject())
    signed = {**CONFIG, **signature(tmp_path, fab_hash, CONFIG)}  # made from ca.key
    verify_run(load_ca((tmp_path / "ca.crt").read_bytes()), fab, fab_hash, signed)
    (tmp_path / "ca.key").unlink()
    for name in ("app-signing.crt", "app-signing.key"):
        (tmp_path / name).unlink()
    with pytest.raises(RuntimeError, match="--renew-app-signing"):
        signature(tmp_path, fab_hash, CONFIG)
