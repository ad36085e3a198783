"""What both ends of a federation share, and nothing else.

The centre (``fl_server``) and the hospitals (``fl_client``) never import each other; what they
must agree on lives here: the format of the consortium's app signature (the centre signs, a site
verifies), how an address is read and when clear text is allowed, how key files are written,
how our commands supervise Flower's processes (standard library and ``cryptography``), and how
the model crosses the wire (:mod:`fl_common.wire`: numpy, torch and Flower's arrays).
"""

from importlib.metadata import PackageNotFoundError, version

WIRE_DTYPES = ("float32", "float16")  # the forms a model may travel in (fl_common.wire)
VERSION_KEY = "egcmf-version"  # in every message's config: the centre's version of this package


def package_version() -> str:
    """This installation's version of EGCMF-FL ("unknown" when run from a bare source tree)."""
    try:
        return version("egcmf-fl")
    except PackageNotFoundError:
        return "unknown"
