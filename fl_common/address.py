"""Network addresses as users write them (``HOST:PORT``, ``[::]:PORT``), and the clear-text rule.

Clear text (``--insecure``) is allowed on the loopback interface only: weights and metrics would
otherwise cross a network unencrypted and unauthenticated. Whoever really needs it on a closed
test network sets ``EGCMF_ALLOW_INSECURE_NETWORK=1``, and is told so in the log.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)
INSECURE_OVERRIDE = "EGCMF_ALLOW_INSECURE_NETWORK"


@dataclass(frozen=True)
class Address:
    host: str  # without brackets: "0.0.0.0", "::", "fl.example.org"
    port: int

    @property
    def url_host(self) -> str:
        """The host as it appears in a URL or a ``HOST:PORT`` string (IPv6 in brackets)."""
        return f"[{self.host}]" if ":" in self.host else self.host

    def __str__(self) -> str:
        return f"{self.url_host}:{self.port}"


def parse_address(text: str, flag: str) -> Address:
    """``HOST:PORT`` or ``[IPv6]:PORT``; a ``ValueError`` that names ``flag`` otherwise."""
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{flag} {text!r}: write an IPv6 address in brackets, e.g. [::]:8000")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{flag} {text!r} must be HOST:PORT, e.g. 0.0.0.0:8000 or [::]:8000")
    return Address(host, int(port))


def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ``::1``; a name is never resolved here."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_insecure(address: Address, role: str) -> None:
    """Refuse clear text beyond loopback unless the override is set; warn in every case."""
    if not is_loopback(address.host):
        if os.environ.get(INSECURE_OVERRIDE) != "1":
            raise ValueError(
                f"--insecure refuses {address}: without TLS the model's weights and the "
                f"sites' metrics would cross the network in clear text and any machine could "
                f"pose as a {role}. Use it on 127.0.0.1 only, or set {INSECURE_OVERRIDE}=1 "
                "for a closed test network")
        log.warning("INSECURE on %s because %s=1: no TLS and no site authentication; "
                    "weights cross the network in clear text", address, INSECURE_OVERRIDE)
    else:
        log.warning("INSECURE: no TLS and no site authentication (loopback only)")
