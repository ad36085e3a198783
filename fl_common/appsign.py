"""The consortium's signature on a federated run: the centre signs, every site verifies.

``fl-server start`` signs what defines the run it submits: the hash of the Flower app bundle
(FAB) and the run's configuration. It signs with the consortium's app-signing key (Ed25519),
whose certificate the consortium CA issued for code signing, and passes the signature and that
certificate in the run's configuration. A site checks both against the ``ca.crt`` it already
holds before it runs any task of the run; it never imports code from the bundle either way.

Signed bytes: ``DOMAIN``, the FAB's SHA-256 in hex, a newline, then the run configuration
(without the two signature entries) as canonical JSON. The domain string keeps this signature
from ever being valid for anything else the key might sign.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID

DOMAIN = b"EGCMF-FL consortium app signature v1\n"
SIGNATURE_KEY, SIGNER_KEY = "app-signature", "app-signer"  # run-config entries


class AppRejected(Exception):
    """The run is not the consortium's: its reason says what failed."""


def signed_bytes(fab_hash: str, run_config: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in run_config.items() if k not in (SIGNATURE_KEY, SIGNER_KEY)}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return DOMAIN + fab_hash.encode("ascii") + b"\n" + canonical.encode("ascii")


def sign_run(key: ed25519.Ed25519PrivateKey, signer_pem: bytes, fab_hash: str,
             run_config: Mapping[str, Any]) -> dict[str, str]:
    """The two run-config entries that carry the signature and the signer's certificate."""
    signature = key.sign(signed_bytes(fab_hash, run_config))
    return {SIGNATURE_KEY: base64.b64encode(signature).decode("ascii"),
            SIGNER_KEY: signer_pem.decode("ascii")}


def verify_run(ca: x509.Certificate, fab_content: bytes, fab_hash: str,
               run_config: Mapping[str, Any]) -> x509.Certificate:
    """Check that the consortium signed this bundle and configuration; returns the signer's
    certificate. Raises :class:`AppRejected` with the reason otherwise."""
    if hashlib.sha256(fab_content).hexdigest() != fab_hash:
        raise AppRejected("the app bundle does not match its announced hash")
    if not run_config.get(SIGNATURE_KEY) or not run_config.get(SIGNER_KEY):
        raise AppRejected("the run carries no consortium signature")
    try:
        signer = x509.load_pem_x509_certificate(str(run_config[SIGNER_KEY]).encode("ascii"))
        signature = base64.b64decode(str(run_config[SIGNATURE_KEY]), validate=True)
    except ValueError as exc:
        raise AppRejected(f"the run's signature is malformed ({exc})") from exc
    _check_signer(ca, signer)
    public_key = signer.public_key()
    if not isinstance(public_key, ed25519.Ed25519PublicKey):
        raise AppRejected("the signer's key is not an Ed25519 app-signing key")
    try:
        public_key.verify(signature, signed_bytes(fab_hash, run_config))
    except InvalidSignature as exc:
        raise AppRejected("the signature does not match this app and configuration") from exc
    return signer


def _check_signer(ca: x509.Certificate, signer: x509.Certificate) -> None:
    """The signer's certificate: issued by our CA, for code signing, not a CA, valid now."""
    try:
        signer.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise AppRejected("the app was signed by a key that the consortium CA did not "
                          f"certify (signer: {signer.subject.rfc4514_string()})") from exc
    now = dt.datetime.now(dt.UTC)
    if not signer.not_valid_before_utc <= now <= signer.not_valid_after_utc:
        raise AppRejected("the app-signing certificate has expired or is not yet valid")
    try:
        usage = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        constraints = signer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound as exc:
        raise AppRejected("the signer's certificate is not an app-signing certificate") \
            from exc
    if ExtendedKeyUsageOID.CODE_SIGNING not in usage or constraints.ca:
        raise AppRejected("the signer's certificate is not an app-signing certificate")


def load_ca(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def load_signing_key(pem: bytes) -> ed25519.Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError("the app-signing key is not an Ed25519 key")
    return key
