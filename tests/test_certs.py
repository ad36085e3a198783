"""Key material: files, modes, SANs, no silent overwrite; and fl-client's early refusals."""

from __future__ import annotations

import ipaddress
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from egcmf_model.procs import free_port
from fl_client.cli import main as client_main
from fl_server.certs import make_certificates
from fl_server.cli import main as server_main


def test_layout_modes_and_sans(tmp_path: Path) -> None:
    assert server_main(["certs", "--out", str(tmp_path), "--sites", "plagh,siteB",
                        "--hostnames", "fl.example.org,10.1.2.3"]) == 0
    files = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert files == {"ca.crt", "ca.key", "server.crt", "server.key", "sites/plagh",
                     "sites/plagh.pub", "sites/siteB", "sites/siteB.pub"}
    for name in files:
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        public = name.endswith((".crt", ".pub"))
        assert mode == (0o644 if public else 0o600), name
    cert = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "fl.example.org"}
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.1.2.3")}
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    key = load_ssh_private_key((tmp_path / "sites" / "plagh").read_bytes(), None)
    assert key.curve.name == "secp384r1"


def test_existing_keys_are_not_overwritten_without_force(tmp_path: Path, capsys) -> None:
    make_certificates(tmp_path, ["a"])
    before = (tmp_path / "ca.key").read_bytes()
    assert server_main(["certs", "--out", str(tmp_path), "--sites", "a"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "ca.key").read_bytes() == before
    assert server_main(["certs", "--out", str(tmp_path), "--sites", "a", "--force"]) == 0
    assert (tmp_path / "ca.key").read_bytes() != before


def test_bad_site_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="site names"):
        make_certificates(tmp_path, ["../evil"])


def test_client_refuses_an_invalid_site_folder(tmp_path: Path, capsys) -> None:
    make_certificates(tmp_path / "certs", ["plagh"])
    (tmp_path / "data").mkdir()
    assert client_main(["--site", "plagh", "--data", str(tmp_path / "data"),
                        "--certs", str(tmp_path / "certs")]) == 1
    err = capsys.readouterr().err
    assert "not valid; not joining" in err
    assert "site.yaml" in err
    assert "Traceback" not in err


def test_client_gives_up_on_an_unreachable_server(tmp_path: Path, synth_root: Path,
                                                  capsys) -> None:
    make_certificates(tmp_path / "certs", ["plagh"])
    start = time.monotonic()
    code = client_main(["--site", "plagh", "--server", f"127.0.0.1:{free_port()}",
                        "--data", str(synth_root / "site_01"), "--certs",
                        str(tmp_path / "certs"), "--max-wait", "3"])
    assert code == 3
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert "unreachable after 3s" in err
    assert "Traceback" not in err


def test_server_without_certificates_says_what_to_do(tmp_path: Path, capsys) -> None:
    assert server_main(["start", "--certs", str(tmp_path / "none"),
                        "--run-dir", str(tmp_path / "run")]) == 2
    assert "fl-server certs" in capsys.readouterr().err


def test_server_refuses_a_round_timeout_that_is_not_positive(tmp_path: Path, capsys) -> None:
    assert server_main(["start", "--round-timeout", "0", "--run-dir", str(tmp_path / "run")]) == 2
    assert "--round-timeout must be positive" in capsys.readouterr().err
