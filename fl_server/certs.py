"""The centre's key material, made with `cryptography`.

Layout of ``DIR`` (:func:`make_certificates`, :func:`add_site`)::

    ca.crt  ca.key             the consortium's certificate authority (ca.key: keep offline)
    server.crt  server.key     the SuperLink's TLS identity (SANs: localhost, 127.0.0.1, ::1...)
    app-signing.crt  .key      the consortium's app-signing key (Ed25519), certified by the CA
    sites/<name>.pub           each hospital's public key, made at the hospital
    sites/<name>               only with --sites (tests, demos): the private key, made here

Private keys are mode 0600; every file is written to a temporary file and renamed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fl_common.files import atomic_write
from fl_common.sitekeys import (
    check_site_name,
    load_site_public_key,
    public_key_line,
    write_site_keypair,
)

VALID_DAYS = 825  # the longest lifetime browsers still accept for server certificates
APP_SIGNING = "app-signing"


def _pem_key(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "EGCMF-FL federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca,
                         content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, encipher_only=False,
                         decipher_only=False)


def _certificate(subject: x509.Name, issuer: x509.Name, public_key, signing_key,
                 purpose: x509.ObjectIdentifier | None,
                 sans: Sequence[x509.GeneralName] = ()) -> x509.Certificate:
    """A CA certificate (``purpose`` None) or a leaf for one extended key usage."""
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=purpose is None, path_length=None),
                              critical=True)
               .add_extension(_usage(ca=purpose is None), critical=True))
    if purpose is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
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


def make_certificates(out: Path, sites: Sequence[str] = (), hostnames: Sequence[str] = (),
                      force: bool = False) -> list[Path]:
    """Write the CA, the server certificate, the app-signing key and, for tests and demos, one
    key pair per name in ``sites``; returns the files written."""
    for site in sites:
        check_site_name(site)
    targets = [out / "ca.key", out / "server.key", out / f"{APP_SIGNING}.key",
               *(out / "sites" / s for s in sites)]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{existing[0]} exists; refusing to overwrite keys "
                              "(pass --force to replace them, e.g. to rotate)")
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("EGCMF-FL federation CA")
    ca_cert = _certificate(ca_name, ca_name, ca_key.public_key(), ca_key, None)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _certificate(_name("EGCMF-FL SuperLink"), ca_name, server_key.public_key(),
                               ca_key, ExtendedKeyUsageOID.SERVER_AUTH, server_sans(hostnames))
    pem = serialization.Encoding.PEM
    files = {out / "ca.crt": (ca_cert.public_bytes(pem), False),
             out / "ca.key": (_pem_key(ca_key), True),
             out / "server.crt": (server_cert.public_bytes(pem), False),
             out / "server.key": (_pem_key(server_key), True),
             **_app_signing(out, ca_key, ca_name)}
    for path, (data, private) in files.items():
        atomic_write(path, data, private)
    written = list(files)
    for site in sites:
        written += write_site_keypair(out / "sites", site, force=True)
    return written


def _app_signing(out: Path, ca_key: ec.EllipticCurvePrivateKey, ca_name: x509.Name
                 ) -> dict[Path, tuple[bytes, bool]]:
    """A fresh Ed25519 app-signing key and its code-signing certificate from the CA."""
    key = ed25519.Ed25519PrivateKey.generate()
    cert = _certificate(_name("EGCMF-FL app signing"), ca_name, key.public_key(), ca_key,
                        ExtendedKeyUsageOID.CODE_SIGNING)
    return {out / f"{APP_SIGNING}.crt": (cert.public_bytes(serialization.Encoding.PEM), False),
            out / f"{APP_SIGNING}.key": (_pem_key(key), True)}


def renew_app_signing(out: Path) -> list[Path]:
    """Replace the app-signing key and certificate, certified by the existing CA (``ca.key``
    must be present); sites accept the new signer with the ``ca.crt`` they already hold."""
    try:
        ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"renewing the app-signing key needs the consortium CA's ca.key and "
                         f"ca.crt in {out} ({exc})") from exc
    files = _app_signing(out, ca_key, ca_cert.subject)
    for path, (data, private) in files.items():
        atomic_write(path, data, private)
    return list(files)


def add_site(out: Path, public_key: Path, name: str | None = None, force: bool = False) -> Path:
    """Register a hospital's public key (made there with ``fl-client keygen``) as
    ``out/sites/<name>.pub``, without touching the CA. ``name`` defaults to the file's stem.
    Refuses a name already taken or a key already registered under another name."""
    site = check_site_name(name or public_key.name.removesuffix(".pub"))
    key = load_site_public_key(public_key)
    line = public_key_line(key)
    target = out / "sites" / f"{site}.pub"
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists: a site named {site} is already registered "
                              "(pass --force to replace its key)")
    for other, path in site_public_keys(out).items():
        if other != site and load_site_public_key(path) == key:
            raise ValueError(f"{public_key}: this key is already registered as site {other}; "
                             "every hospital needs its own key (fl-client keygen)")
    atomic_write(target, line, private=False)
    return target


def site_public_keys(certs: Path) -> dict[str, Path]:
    """Site name -> public key file, for every ``sites/<name>.pub``."""
    return {p.name.removesuffix(".pub"): p for p in sorted((certs / "sites").glob("*.pub"))}
