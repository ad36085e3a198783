"""Where a hospital keeps what must outlive a run: never in a cache.

``<state-dir>/<site>/`` (mode 0700) holds the site's privacy ledger (``privacy.json``), its
FedBN layers, the logs of its node, the lock that keeps a second ``fl-client`` of the site out,
and, while ``fl-client`` runs, ``runtime/``: the secret that lets only our runner take tasks
from the local SuperNode, the TLS identity the node serves them with, and the runner's status.
Clearing a cache (``~/.cache``, ``$EGCMF_CACHE``) never resets a privacy budget.

Default: ``$EGCMF_STATE_DIR``, else ``$XDG_STATE_HOME/egcmf-fl``, else
``~/.local/state/egcmf-fl`` (the XDG base-directory place for state that is not a cache).
"""

from __future__ import annotations

import fcntl
import grp
import os
import pwd
import stat
from pathlib import Path

from fl_common.files import private_dir

STATE_ENV = "EGCMF_STATE_DIR"
OWN_FOLDER = ("choose a folder of this user's own (the default: $EGCMF_STATE_DIR, else "
              "~/.local/state/egcmf-fl)")


def default_state_dir() -> Path:
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV]).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "egcmf-fl"


def site_state_dir(root: Path, site: str) -> Path:
    """``root/site``, created private (0700); a ``ValueError`` if it cannot be written. ``root``
    is created private when missing; one that exists is used as it is, never re-moded, and
    refused when other users may write in it (``/tmp``, say): they could put files, or links,
    where the site keeps its privacy ledger."""
    root = root.expanduser()
    try:
        if root.is_dir() and others_can_write(root.stat()):
            raise ValueError(f"--state-dir {root} can be written by other users (mode "
                             f"{stat.S_IMODE(root.stat().st_mode):o}); {OWN_FOLDER}")
        _check_parents(root)
    except OSError as exc:
        raise ValueError(f"--state-dir {root} cannot be checked ({exc.strerror or exc}); "
                         f"{OWN_FOLDER}") from exc
    if not root.exists():
        private_dir(root, "--state-dir")
    return private_dir(root / site, "--state-dir")


def _check_parents(root: Path) -> None:
    """Refuse a state folder whose parents another user could rename or replace it in: owned
    by another user (root aside), or writable by others without the sticky bit (``/tmp`` has
    it). Such a user could move the privacy ledger away and reset the site's budget. Both the
    folders as written and as links resolve them are checked: a link in a shared folder could
    be pointed elsewhere."""
    written = Path(os.path.abspath(root))
    for folder in dict.fromkeys([*written.parents, *written.resolve().parents]):
        if not folder.exists():  # made private below
            continue
        info = folder.stat()
        if info.st_uid not in (0, os.getuid()):
            raise ValueError(f"--state-dir {root}: {folder} belongs to another user, who "
                             f"could move the site's state away; {OWN_FOLDER}")
        if others_can_write(info) and not info.st_mode & stat.S_ISVTX:
            raise ValueError(f"--state-dir {root}: {folder} can be written by other users "
                             f"(mode {stat.S_IMODE(info.st_mode):o}), who could move the "
                             f"site's state away; {OWN_FOLDER}")


def others_can_write(info: os.stat_result) -> bool:
    """Whether a user other than this one may write in a folder of ``info``: writable by all,
    or by a group with another member (a group of this user alone, as umask 002 systems give
    each user, does not count)."""
    if info.st_mode & 0o002:
        return True
    return bool(info.st_mode & 0o020) and not _own_group(info.st_gid)


def _own_group(gid: int) -> bool:
    """Whether group ``gid`` holds this user alone (as members and as primary group)."""
    try:
        group = grp.getgrgid(gid)
        me = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return False
    members = set(group.gr_mem) | {u.pw_name for u in pwd.getpwall() if u.pw_gid == gid}
    return members <= {me}


class SiteLock:
    """One ``fl-client`` per site and state folder: a lock on ``<state>/fl-client.lock``,
    held while it runs and released by the operating system however it ends."""

    def __init__(self, state: Path, site: str) -> None:
        self.path = state / "fl-client.lock"
        try:  # never through a link, never another user's file
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise ValueError(f"{self.path} cannot be opened ({exc.strerror or exc}); remove it "
                             "if no fl-client of this site runs") from None
        if os.fstat(fd).st_uid != os.getuid():
            os.close(fd)
            raise ValueError(f"{self.path} belongs to another user; remove it if no fl-client "
                             "of this site runs")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ValueError(f"another fl-client for site {site} is running with this "
                             f"--state-dir (pid {holder}); stop it first (one per site), or "
                             f"check its log in {state / 'logs'}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        os.close(self.fd)
