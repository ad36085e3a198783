"""Child processes of our command-line tools: started in their own session, always stopped.

``fl-server`` and ``fl-client`` wrap Flower's own executables (SuperLink, SuperNode, ``flwr``);
Ctrl-C or SIGTERM on our command stops every child and grandchild it started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

log = logging.getLogger(__name__)
HELPER_GRACE = 3.0  # seconds Flower's helper processes get to exit after SIGTERM


def flower_executable(name: str) -> str:
    """Path of a Flower console script installed beside this Python (or on PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found; install the project with pip install -e .")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def flower_env(**extra: str) -> dict[str, str]:
    """Our environment for Flower processes: telemetry and the update check off, always
    (hospitals do not phone home)."""
    return {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            **extra}


class Children:
    """Processes started in new sessions and stopped (whole process groups) on exit."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: Sequence[str], log_file: Path | None,
              env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``args``; its output goes to ``log_file`` (appended), or to our own stderr."""
        out = None
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            out = log_file.open("ab")
        proc = subprocess.Popen(list(args), stdout=out or sys.stderr,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env or flower_env(), start_new_session=True,
                                preexec_fn=_die_with_parent)
        if out is not None:
            out.close()
        self.procs.append((name, proc))
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(args))
        return proc

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every child's process group, then SIGKILL; then the same for every process
        our children had started when stopping began (Flower starts some in sessions of their own,
        which outlive a group's signal), reaping all of them (we are their subreaper)."""
        tree = _descendants({proc.pid for _, proc in self.procs})
        for _, proc in reversed(self.procs):
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _, proc in reversed(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            _signal_group(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self.procs.clear()
        _stop_all(tree, min(grace, HELPER_GRACE))


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if our process dies, even by SIGKILL (no orphans holding
    ports). Elsewhere a no-op; the process-group shutdown in :meth:`Children.stop` remains."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _become_subreaper() -> None:
    """Linux: orphaned descendants are re-parented to us instead of PID 1, so we can reap them.
    Flower's helpers exit when their parent is gone; an unreaped (zombie) parent hides that."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_child_subreaper = 36
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_child_subreaper, 1)


def _table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process we can see (Linux /proc)."""
    table = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        table[int(entry.name)] = (int(fields[1]), fields[0])
    return table


def _descendants(roots: set[int]) -> set[int]:
    table, found, frontier = _table(), set(roots), set(roots)
    while frontier:
        frontier = {pid for pid, (parent, _) in table.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    """The live (not zombie) processes among ``pids``."""
    return {pid for pid, (_, state) in _table().items() if state != "Z" and pid in pids}


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _stop_all(pids: set[int], grace: float) -> None:
    deadline = time.monotonic() + grace
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _alive(pids):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        while _alive(pids) and time.monotonic() < deadline:
            _reap()
            time.sleep(0.2)
        _reap()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


@contextlib.contextmanager
def supervised() -> Iterator[Children]:
    """Children that are stopped on return, on exceptions, on Ctrl-C and on SIGTERM."""
    _become_subreaper()
    children = Children()
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        yield children
    finally:
        children.stop()
        signal.signal(signal.SIGTERM, previous)
