"""Where a hospital keeps what must outlive a run: never in a cache.

``<state-dir>/<site>/`` (mode 0700) holds the site's privacy ledger (``privacy.json``), its
FedBN layers, the logs of its node, and ``runtime/``: the secret that lets only our runner take
tasks from the local SuperNode, and the runner's status. Clearing a cache (``~/.cache``,
``$EGCMF_CACHE``) never resets a privacy budget.

Default: ``$EGCMF_STATE_DIR``, else ``$XDG_STATE_HOME/egcmf-fl``, else
``~/.local/state/egcmf-fl`` (the XDG base-directory place for state that is not a cache).
"""

from __future__ import annotations

import os
from pathlib import Path

from fl_common.files import private_dir

STATE_ENV = "EGCMF_STATE_DIR"


def default_state_dir() -> Path:
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV]).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "egcmf-fl"


def site_state_dir(root: Path, site: str) -> Path:
    """``root/site``, created private (0700); a ``ValueError`` if it cannot be written."""
    private_dir(root, "--state-dir")
    return private_dir(root / site, "--state-dir")
