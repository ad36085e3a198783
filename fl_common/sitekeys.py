"""A hospital's authentication key pair: made at the hospital, its public half registered.

Layout, the same at a hospital and (for its public half) at the centre::

    sites/<name>        private key, OpenSSH format, NIST P-384, mode 0600 (hospital only)
    sites/<name>.pub    public key, OpenSSH format (travels to the centre)

Flower's SuperNode authentication takes NIST curves; P-384 matches the consortium CA.
"""

from __future__ import annotations

import re
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .files import atomic_write

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")


def check_site_name(name: str) -> str:
    if not SITE_NAME.match(name):
        raise ValueError(f"site name {name!r} must start with a letter or digit and use only "
                         "letters, digits, '.', '_' or '-' (at most 64)")
    return name


def write_site_keypair(sites_dir: Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """Make a P-384 key pair for site ``name`` in ``sites_dir``; never overwrite without
    ``force``. Returns the private and public key files."""
    check_site_name(name)
    private, public = sites_dir / name, sites_dir / f"{name}.pub"
    if not force and (private.exists() or public.exists()):
        raise FileExistsError(f"{private} exists; refusing to overwrite a site key (pass "
                              "--force to replace it, then register the new .pub at the centre)")
    key = ec.generate_private_key(ec.SECP384R1())
    atomic_write(private, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()), private=True)
    atomic_write(public, public_key_line(key.public_key()), private=False)
    return private, public


def public_key_line(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.OpenSSH,
                            serialization.PublicFormat.OpenSSH) + b"\n"


def load_site_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """An OpenSSH NIST-curve EC public key, or a ``ValueError`` naming the file."""
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (OSError, ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{path}: not an OpenSSH public key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in NIST_CURVES:
        raise ValueError(f"{path}: a site key must be an EC key on a NIST curve (P-384); make "
                         "it with fl-client keygen")
    return key

