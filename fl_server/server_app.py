"""The coordinating centre's ServerApp: read the run settings, run the rounds."""

from __future__ import annotations

from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .federation import FederationSettings, run_federation


def make_server_app(defaults: dict[str, Any] | None = None) -> ServerApp:
    """The ServerApp; ``defaults`` stand in for a run config (the simulation passes them)."""
    app = ServerApp()
    fixed = dict(defaults or {})

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, FederationSettings.from_run_config(context.run_config, fixed))

    return app


app = make_server_app()
