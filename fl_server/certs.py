"""Key material for a federation, made with `cryptography`.

Layout written by :func:`make_certificates` (``DIR``)::

    ca.crt  ca.key             the consortium's certificate authority (ca.key stays at the centre)
    server.crt  server.key     the SuperLink's TLS identity (SANs: localhost, 127.0.0.1, ::1, ...)
    sites/<name>  <name>.pub   each site's authentication key pair (NIST P-384, OpenSSH format)

Every file but ``*.crt`` and ``*.pub`` is written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VALID_DAYS = 825  # the longest lifetime browsers still accept for server certificates


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600 if private else 0o644)  # also when the file already existed


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "EGCMF-FL federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: x509.Name, issuer: x509.Name, public_key, signing_key,
                 ca: bool, sans: Sequence[x509.GeneralName] = ()) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def server_sans(hostnames: Sequence[str]) -> list[x509.GeneralName]:
    """localhost, 127.0.0.1 and ::1, plus each hostname or IP address given."""
    names: list[x509.GeneralName] = [x509.DNSName("localhost"),
                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                     x509.IPAddress(ipaddress.ip_address("::1"))]
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_certificates(out: Path, sites: Sequence[str], hostnames: Sequence[str] = (),
                      force: bool = False) -> list[Path]:
    """Write the CA, the server certificate and one key pair per site; returns the files."""
    bad = [s for s in sites if not SITE_NAME.match(s)]
    if bad:
        raise ValueError(f"site names {bad} must be letters, digits, '.', '_' or '-'")
    targets = [out / "ca.key", out / "server.key", *(out / "sites" / s for s in sites)]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{existing[0]} exists; refusing to overwrite keys "
                              "(pass --force to replace them, e.g. to rotate)")
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("EGCMF-FL federation CA")
    ca_cert = _certificate(ca_name, ca_name, ca_key.public_key(), ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _certificate(_name("EGCMF-FL SuperLink"), ca_name, server_key.public_key(),
                               ca_key, ca=False, sans=server_sans(hostnames))
    pem = serialization.Encoding.PEM
    files = {out / "ca.crt": (ca_cert.public_bytes(pem), False),
             out / "ca.key": (_pem_key(ca_key), True),
             out / "server.crt": (server_cert.public_bytes(pem), False),
             out / "server.key": (_pem_key(server_key), True)}
    for site in sites:
        key = ec.generate_private_key(ec.SECP384R1())
        files[out / "sites" / site] = (key.private_bytes(
            pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()), True)
        files[out / "sites" / f"{site}.pub"] = (key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n", False)
    for path, (data, private) in files.items():
        _write(path, data, private)
    return list(files)


def site_public_keys(certs: Path) -> dict[str, Path]:
    """Site name -> public key file, for every ``sites/<name>.pub``."""
    return {p.stem: p for p in sorted((certs / "sites").glob("*.pub"))}
