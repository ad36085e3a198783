"""The TLS identity of a site's local channel between its SuperNode and its runner.

``fl-client`` makes a new one at every start, in the site's 0700 runtime folder: a key (mode
0600) and a self-signed certificate for 127.0.0.1. The SuperNode serves its Runtime API with
them and the runner trusts that certificate alone, so a process that takes the port first
(another local user, say) cannot pass for the SuperNode: the runner refuses the connection
before it sends a request, and never runs a task such a process hands out.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .files import atomic_write

LOOPBACK = "127.0.0.1"
VALID_DAYS = 365  # one fl-client start; a new identity comes with the next


def write_local_identity(folder: Path) -> tuple[Path, Path]:
    """Write ``local.crt`` and ``local.key`` (0600) into ``folder``; returns their paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "EGCMF-FL site node (local)")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(LOOPBACK))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "local.crt", folder / "local.key"
    atomic_write(key_file, key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()), private=True)
    atomic_write(cert_file, cert.public_bytes(serialization.Encoding.PEM), private=True)
    return cert_file, key_file
