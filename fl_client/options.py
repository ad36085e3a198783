"""What a hospital chooses when it joins: every fl-client default is declared here, once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .state import default_state_dir


class JoinError(RuntimeError):
    """A reason not to join (or to stop), with the exit code fl-client returns."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class JoinOptions:
    site: str
    server: str = "127.0.0.1:8000"  # the centre's HOST:PORT
    data: Path = Path("data")  # this site's site folder
    certs: Path = Path("certs")  # ca.crt and sites/<site>
    state_dir: Path = field(default_factory=default_state_dir)  # never a cache
    device: str = "auto"
    max_wait: float = 300.0  # seconds without the centre before giving up
    insecure: bool = False
    dp: bool = False  # DP-SGD at this site, with its own budget
    epsilon: float = 8.0
    delta: float = 1e-5

    @property
    def key(self) -> Path:
        return self.certs / "sites" / self.site

    @property
    def ca(self) -> Path | None:
        return None if self.insecure else self.certs / "ca.crt"
