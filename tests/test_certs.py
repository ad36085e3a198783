"""Key material: files, modes, SANs, no silent overwrite, keys made at the hospital, sites
added without touching the CA, atomic writes; and fl-client's early refusals."""

from __future__ import annotations

import ipaddress
import os
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from fl_client.cli import main as client_main
from fl_common.files import atomic_write
from fl_common.procs import free_port
from fl_server.certs import make_certificates, site_caps, site_public_keys
from fl_server.cli import main as server_main


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _assert_modes(root: Path) -> None:
    for name in _files(root):
        mode = stat.S_IMODE((root / name).stat().st_mode)
        public = name.endswith((".crt", ".pub", ".json"))
        assert mode == (0o644 if public else 0o600), name


def test_layout_modes_and_sans(tmp_path: Path) -> None:
    assert server_main(["certs", "--out", str(tmp_path), "--sites", "plagh,siteB",
                        "--hostnames", "fl.example.org,10.1.2.3"]) == 0
    assert _files(tmp_path) == {"ca.crt", "ca.key", "server.crt", "server.key",
                                "app-signing.crt", "app-signing.key", "sites/plagh",
                                "sites/plagh.pub", "sites/plagh.json", "sites/siteB",
                                "sites/siteB.pub", "sites/siteB.json"}
    _assert_modes(tmp_path)
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
    with pytest.raises(ValueError, match="site name"):
        make_certificates(tmp_path, ["../evil"])
    assert client_main(["keygen", "--site", "../evil", "--out", str(tmp_path / "h")]) == 2
    assert not (tmp_path / "h").exists()


def test_hospitals_make_their_keys_and_the_centre_adds_them_without_touching_the_ca(
        tmp_path: Path, capsys) -> None:
    """The documented flow: the centre's folder never holds a hospital's private key."""
    centre, plagh, other = tmp_path / "centre", tmp_path / "plagh", tmp_path / "other"
    assert server_main(["certs", "--out", str(centre), "--hostnames", "fl.example.org"]) == 0
    assert _files(centre) == {"ca.crt", "ca.key", "server.crt", "server.key",
                              "app-signing.crt", "app-signing.key"}
    assert client_main(["keygen", "--site", "plagh", "--out", str(plagh)]) == 0
    assert _files(plagh) == {"sites/plagh", "sites/plagh.pub"}
    _assert_modes(plagh)
    assert stat.S_IMODE((plagh / "sites" / "plagh").stat().st_mode) == 0o600
    key = load_ssh_private_key((plagh / "sites" / "plagh").read_bytes(), None)
    assert key.curve.name == "secp384r1"
    before = {n: (centre / n).read_bytes() for n in _files(centre)}
    assert server_main(["certs", "--out", str(centre), "--add-site",
                        str(plagh / "sites" / "plagh.pub")]) == 2
    assert "--max-examples" in capsys.readouterr().err  # the centre must say what it knows
    assert server_main(["certs", "--out", str(centre), "--add-site",
                        str(plagh / "sites" / "plagh.pub"), "--max-examples", "40"]) == 0
    assert {n: (centre / n).read_bytes() for n in before} == before  # CA untouched
    assert _files(centre) - set(before) == {"sites/plagh.pub", "sites/plagh.json"}
    assert site_caps(centre) == {"plagh": 40}
    assert (centre / "sites" / "plagh.pub").read_bytes() == (
        plagh / "sites" / "plagh.pub").read_bytes()
    assert list(site_public_keys(centre)) == ["plagh"]

    # The same name twice, the same key under another name, and a file that is not a key.
    assert client_main(["keygen", "--site", "plagh", "--out", str(other)]) == 0
    cap = ["--max-examples", "40"]
    assert server_main(["certs", "--out", str(centre), "--add-site",
                        str(other / "sites" / "plagh.pub"), *cap]) == 2
    assert "already registered" in capsys.readouterr().err
    assert server_main(["certs", "--out", str(centre), "--add-site",
                        str(plagh / "sites" / "plagh.pub"), "--name", "siteB", *cap]) == 2
    assert "already registered as site plagh" in capsys.readouterr().err
    assert server_main(["certs", "--out", str(centre), "--add-site",
                        str(centre / "ca.crt"), "--name", "siteC", *cap]) == 2
    assert "not an OpenSSH public key" in capsys.readouterr().err
    assert list(site_public_keys(centre)) == ["plagh"]
    # keygen never overwrites a hospital's key silently
    old = (plagh / "sites" / "plagh").read_bytes()
    assert client_main(["keygen", "--site", "plagh", "--out", str(plagh)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (plagh / "sites" / "plagh").read_bytes() == old


def test_a_site_key_without_a_registered_cap_is_refused_at_start(tmp_path: Path,
                                                                   capsys) -> None:
    """The cap on a site's num-examples is the centre's record, never the site's claim: a key
    registered without one (a folder from before caps) stops fl-server start before anything
    runs, naming the site and the command that registers its cap."""
    make_certificates(tmp_path / "certs", ["plagh", "siteB"])
    (tmp_path / "certs" / "sites" / "siteB.json").unlink()
    assert server_main(["start", "--certs", str(tmp_path / "certs"), "--address",
                        f"127.0.0.1:{free_port()}", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "site(s) siteB" in err
    assert "--add-site" in err
    assert "--max-examples N --force" in err
    assert not (tmp_path / "run").exists()
    for bad in ("0", "-5"):
        assert server_main(["certs", "--out", str(tmp_path / "certs"), "--add-site",
                            str(tmp_path / "certs" / "sites" / "siteB.pub"), "--force",
                            "--max-examples", bad]) == 2
    assert server_main(["certs", "--out", str(tmp_path / "certs"), "--add-site",
                        str(tmp_path / "certs" / "sites" / "siteB.pub"), "--force",
                        "--max-examples", "12"]) == 0
    assert site_caps(tmp_path / "certs") == {"plagh": 1000, "siteB": 12}


def test_key_files_are_replaced_whole_or_not_at_all(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "sites" / "plagh"
    atomic_write(key, b"old key", private=True)
    os.chmod(key, 0o644)  # even a file someone loosened comes back private

    def crash(*args):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", crash)
        with pytest.raises(OSError, match="disk full"):
            atomic_write(key, b"new key that never lands", private=True)
    assert key.read_bytes() == b"old key"  # not truncated, not half-written
    assert _files(tmp_path) == {"sites/plagh"}  # no temporary file left behind
    atomic_write(key, b"new key", private=True)
    assert key.read_bytes() == b"new key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        atomic_write(key, b"other", private=True, overwrite=False)
    assert key.read_bytes() == b"new key"


def test_client_refuses_an_invalid_site_folder(tmp_path: Path, capsys) -> None:
    make_certificates(tmp_path / "certs", ["plagh"])
    (tmp_path / "data").mkdir()
    assert client_main(["--site", "plagh", "--data", str(tmp_path / "data"),
                        "--certs", str(tmp_path / "certs"),
                        "--state-dir", str(tmp_path / "state")]) == 1
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
                        str(tmp_path / "certs"), "--max-wait", "3",
                        "--state-dir", str(tmp_path / "state")])
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


def test_client_refuses_a_state_folder_it_cannot_write(tmp_path: Path, synth_root: Path,
                                                       capsys) -> None:
    make_certificates(tmp_path / "certs", ["plagh"])
    locked = tmp_path / "locked"
    locked.write_text("a file, not a folder")
    code = client_main(["--site", "plagh", "--data", str(synth_root / "site_01"), "--certs",
                        str(tmp_path / "certs"), "--state-dir", str(locked / "state")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--state-dir" in err
    assert "Traceback" not in err


def test_a_site_without_the_centres_ca_is_told_to_ask_for_it(tmp_path: Path,
                                                             synth_root: Path, capsys) -> None:
    """A hospital that made its key but has no ca.crt yet is told to get ca.crt from the
    centre, not to make a key it already has."""
    hospital = tmp_path / "certs"
    assert client_main(["keygen", "--site", "plagh", "--out", str(hospital)]) == 0
    capsys.readouterr()
    code = client_main(["--site", "plagh", "--data", str(synth_root / "site_01"), "--certs",
                        str(hospital), "--state-dir", str(tmp_path / "state")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{hospital / 'ca.crt'} is missing: ask the coordinating centre for its ca.crt" in err
    assert "keygen" not in err


def test_a_state_folder_others_can_write_is_refused_and_never_re_moded(
        tmp_path: Path, synth_root: Path, capsys) -> None:
    """``--state-dir /tmp`` (or any folder other users may write in) is refused in one line and
    left as it was; a folder of the user's own keeps its mode, and the site's folder inside it
    is private; a missing one is made private."""
    from fl_client.state import site_state_dir

    make_certificates(tmp_path / "certs", ["plagh"])
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    code = client_main(["--site", "plagh", "--data", str(synth_root / "site_01"), "--certs",
                        str(tmp_path / "certs"), "--state-dir", str(shared)])
    assert code == 2
    err = capsys.readouterr().err
    assert "can be written by other users (mode 1777)" in err
    assert "Traceback" not in err
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    assert list(shared.iterdir()) == []
    own = tmp_path / "own"
    own.mkdir(mode=0o755)
    own.chmod(0o755)
    site = site_state_dir(own, "plagh")
    assert stat.S_IMODE(own.stat().st_mode) == 0o755
    assert stat.S_IMODE(site.stat().st_mode) == 0o700
    fresh = site_state_dir(tmp_path / "new" / "state", "plagh")
    assert stat.S_IMODE(fresh.parent.stat().st_mode) == 0o700
    # inside a folder others may write in (no sticky bit), they could move the state away
    # and with it the privacy ledger
    (shared / "mine").mkdir(mode=0o700)
    shared.chmod(0o777)
    with pytest.raises(ValueError, match=r"shared can be written by other users \(mode 777\), "
                                         r"who could move the site's state away"):
        site_state_dir(shared / "mine", "plagh")


def test_a_state_folder_is_judged_by_who_can_write_on_its_way(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A group-writable folder of a group that holds this user alone (umask 002 systems give
    each user one) is accepted, one of a shared group is not; a link in a shared folder is
    judged where it stands, not only where it leads (it could be pointed elsewhere); missing
    folders are made private whatever the umask."""
    import grp
    import pwd

    from fl_client import state as state_module

    members: list[str] = []
    fake = grp.struct_group(("g", "x", os.getgid(), members))
    monkeypatch.setattr(state_module.grp, "getgrgid", lambda gid: fake)
    monkeypatch.setattr(state_module.pwd, "getpwall", lambda: [pwd.getpwuid(os.getuid())])
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o775)
    assert state_module.site_state_dir(home / "state", "plagh").is_dir()
    members.append("a_colleague")
    with pytest.raises(ValueError, match=r"home can be written by other users \(mode 775\)"):
        state_module.site_state_dir(home / "state", "plagh")
    members.remove("a_colleague")  # the group holds this user alone again
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (shared / "fl").symlink_to(private)
    with pytest.raises(ValueError, match=r"shared can be written by other users"):
        state_module.site_state_dir(shared / "fl" / "state", "plagh")
    old = os.umask(0o002)
    try:
        made = state_module.site_state_dir(tmp_path / "a" / "b" / "state", "plagh")
    finally:
        os.umask(old)
    for folder in (tmp_path / "a", tmp_path / "a" / "b", made.parent, made):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def test_a_second_fl_client_for_the_same_site_is_refused(tmp_path: Path) -> None:
    """Two fl-clients of one site and state folder would overwrite each other's runtime
    secrets: the second is refused, naming the first's pid, until the first has stopped."""
    from fl_client.state import SiteLock, site_state_dir

    state = site_state_dir(tmp_path / "state", "plagh")
    first = SiteLock(state, "plagh")
    with pytest.raises(ValueError, match=rf"another fl-client for site plagh is running with "
                                         rf"this --state-dir \(pid {os.getpid()}\)"):
        SiteLock(state, "plagh")
    SiteLock(site_state_dir(tmp_path / "state", "other"), "other").release()  # another site
    first.release()
    SiteLock(state, "plagh").release()  # the first has stopped: the next one starts
    precious = tmp_path / "precious.txt"  # a link in its place is not followed
    precious.write_text("precious data")
    (state / "fl-client.lock").unlink()
    (state / "fl-client.lock").symlink_to(precious)
    with pytest.raises(ValueError, match=r"fl-client.lock cannot be opened"):
        SiteLock(state, "plagh")
    assert precious.read_text() == "precious data"


def test_insecure_refuses_addresses_beyond_loopback(tmp_path: Path, synth_root: Path,
                                                    capsys, monkeypatch) -> None:
    monkeypatch.delenv("EGCMF_ALLOW_INSECURE_NETWORK", raising=False)
    assert server_main(["start", "--insecure", "--address", "0.0.0.0:8000",
                        "--run-dir", str(tmp_path / "run")]) == 2
    assert "EGCMF_ALLOW_INSECURE_NETWORK=1" in capsys.readouterr().err
    assert client_main(["--site", "plagh", "--insecure", "--server", "10.1.2.3:8000",
                        "--data", str(synth_root / "site_01"),
                        "--state-dir", str(tmp_path / "state")]) == 2
    assert "EGCMF_ALLOW_INSECURE_NETWORK=1" in capsys.readouterr().err


def test_a_site_cannot_join_with_a_budget_that_is_no_budget(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """fl-client --dp with epsilon <= 0 or delta outside (0, 1) stops before it joins."""
    for budget in (["--epsilon", "0"], ["--epsilon", "-1"], ["--delta", "1"]):
        with pytest.raises(SystemExit) as stop:
            client_main(["--site", "plagh", "--state-dir", str(tmp_path / "state"), "--dp",
                         *budget])
        assert stop.value.code == 2
        assert "the privacy budget needs epsilon > 0 and 0 < delta < 1" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()
