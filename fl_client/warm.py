"""A simulation's Ray workers import the site's code when they start, not in round 1.

Flower's simulation starts its Ray workers while the centre builds the initial model; each
worker would otherwise import PyTorch and the site's code only when the first message
arrives, inside round 1.
"""

from __future__ import annotations


def prepare_worker() -> None:
    """Ray's ``worker_process_setup_hook``: import the ClientApp's modules (PyTorch included).
    A failure here would end the worker where nobody sees why; the same import then fails
    again with the first message, where Flower reports it."""
    try:
        import fl_client.client_app  # noqa: F401
    except Exception:  # reported with the first message instead
        return
