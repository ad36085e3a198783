"""A site is who its registered key says, never what its reply claims.

``fl-server start`` registers each hospital's public key with the SuperLink, which answers with
the node id that key authenticates as; the launcher passes that node id -> site map to the
ServerApp. Every reply's source node (Flower sets it from the authenticated connection) must
map to a registered site, and the name the reply states must be that site's.

In a simulation there are no keys: every virtual site runs in the researcher's own process and
reads its name from the partition file, so the map is empty and names are taken as stated.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Impostor:
    message: str
    registered: str | None  # the site whose key the node holds (None: no registered key)
    claimed: str | None  # the name the reply states


class SiteIdentity:
    def __init__(self, node_sites: dict[int, str]) -> None:
        self.node_sites = dict(node_sites)
        names = list(self.node_sites.values())
        if len(set(names)) != len(names):
            raise ValueError(f"two registered keys share a site name: {sorted(names)}")

    def describe(self, node: int) -> str:
        site = self.node_sites.get(node)
        return f"site {site} (node {node})" if site else f"node {node}"

    def check(self, node: int, claimed: str | None) -> Impostor | None:
        """None when the reply may be used; otherwise why it may not."""
        if not self.node_sites:  # simulation: no keys, one researcher's process
            return None
        registered = self.node_sites.get(node)
        if registered is None:
            return Impostor(f"node {node} holds no registered site key; reply rejected",
                            None, claimed)
        if claimed != registered:
            return Impostor(f"node {node} is registered as site {registered} but its reply "
                            f"claims to be site {claimed}; reply rejected", registered, claimed)
        return None
