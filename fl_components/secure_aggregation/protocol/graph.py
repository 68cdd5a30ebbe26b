"""The public neighbour graph of SecAgg+.

Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS
(arXiv:2004.04523), Section 3: each client masks with, and shares its seeds among, only its
k neighbours in a random k-regular graph, with k = O(log n). We build a Harary graph (a
ring where each site links to the k/2 nearest on each side) over a random ordering of the
sites. The ordering is derived from a public seed (run id and round) so every party
computes the same graph without a message; it changes every round.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def ring_degree(k: int) -> int:
    """The degree actually used for a requested k: rounded up to even (ring symmetry)."""
    return 2 * ((k + 1) // 2)


def neighbour_graph(
    participants: Sequence[str], *, k: int, run_id: str, round: int
) -> dict[str, frozenset[str]]:
    """Return each participant's neighbours in this round's SecAgg+ graph.

    Parameters
    ----------
    participants : Sequence[str]
        The round's sites.
    k : int
        Requested degree; rounded up to even, and capped at ``n - 1`` (complete graph).
    run_id, round : str, int
        The public seed of the graph.

    Returns
    -------
    dict[str, frozenset[str]]
        Symmetric adjacency: ``v in graph[u]`` iff ``u in graph[v]``.
    """
    n = len(participants)
    half = min(ring_degree(k), n - 1) // 2
    seed = f"fedpipe/graph|{len(run_id)}:{run_id}|{round}".encode()
    ring = sorted(participants, key=lambda site: hashlib.sha256(seed + site.encode()).digest())
    graph: dict[str, set[str]] = {site: set() for site in participants}
    for i, site in enumerate(ring):
        for step in range(1, half + 1):
            other = ring[(i + step) % n]
            graph[site].add(other)
            graph[other].add(site)
    if min(ring_degree(k), n - 1) == n - 1:
        graph = {site: set(participants) - {site} for site in participants}
    return {site: frozenset(peers) for site, peers in graph.items()}
