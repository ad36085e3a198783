"""What a site tells the centre when it cannot answer: the class of failure, never the detail.

Flower would send ``str(exception)`` of a failing ClientApp to the centre, and our exceptions
name files, ROI ids and slide ids. The ClientApp therefore answers a failure with a Flower
``Error`` whose code and reason say only which kind of failure it was; the exception itself,
with its traceback, stays in the site's own log.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import Error

from egcmf_model.config import ConfigError
from egcmf_model.data.io import DataError

from .faults import SimulatedFailure
from .privacy import BudgetExhausted
from .site import IncompatibleFederation

log = logging.getLogger(__name__)

PRIVACY_BUDGET_SPENT = 100  # the site's DP budget would be exceeded: it does not train
SITE_DATA = 101  # the site's data could not be read (a missing, corrupt or unusable file)
INCOMPATIBLE = 102  # the federation's model or configuration does not fit the site
OUT_OF_MEMORY = 103  # the device or the machine ran out of memory
SITE_FAILURE = 104  # anything else: a crash at the site

REASONS = {
    SITE_DATA: "the site's data could not be read",
    INCOMPATIBLE: "the federation's model or configuration does not fit this site (another "
                  "version of EGCMF-FL, other classes, or a network DP-SGD cannot train: --set "
                  "model.norm=group)",
    OUT_OF_MEMORY: "out of memory at the site (a smaller --preset or batch size helps)",
    SITE_FAILURE: "the site failed",
}


def failure_code(exc: BaseException) -> int:
    """The class of failure of ``exc``."""
    if isinstance(exc, BudgetExhausted):
        return PRIVACY_BUDGET_SPENT
    if isinstance(exc, DataError | OSError):
        return SITE_DATA
    if isinstance(exc, IncompatibleFederation | ConfigError):
        return INCOMPATIBLE
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return OUT_OF_MEMORY
    return SITE_FAILURE


def public_error(exc: BaseException, stage: str, site: str = "") -> Error:
    """The Flower ``Error`` sent to the centre for ``exc``; the detail goes to the site's log.

    A privacy-budget refusal keeps its own one-line text (epsilon and the budget, which the
    site reports anyway); a simulated failure says so, for fault-injection experiments.
    """
    code = failure_code(exc)
    who = f"site {site}: " if site else ""
    if code == PRIVACY_BUDGET_SPENT:
        log.warning("%s", exc)
        return Error(code, str(exc))
    log.error("%s%s failed: %s", who, stage, exc, exc_info=exc)
    reason = REASONS[code]
    if isinstance(exc, SimulatedFailure):
        reason = "simulated failure (fault injection)"
    return Error(code, f"{who}{stage} failed: {reason}; the details are in the site's log")
