"""Secure aggregation: the coordinator learns the sum of the updates and nothing else.

Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS (arXiv:1611.04482), run in two stages (mask, unmask), with SecAgg+ sparse
neighbour graphs (Bell et al. 2020, CCS, arXiv:2004.04523) and Shamir sharing (Shamir 1979).

Usage, for one round::

    ctx = RoundContext(run_id="r1", round=3, participants=sites, threshold=t,
                       dimension=d, clip_range=1.0)
    coordinator = SecAggCoordinator(ctx, registry)
    for site in sites:                                   # stage 1, at each site
        coordinator.receive(participants[site].mask_update(ctx, delta[site]).to_bytes())
    requests = coordinator.unmask_requests()             # survivors, dropped, ciphertexts
    responses = [participants[s].unmask_response(ctx, r) for s, r in requests.items()]
    result = coordinator.finish(responses)               # float64 sum + stats

``fl_components`` never imports prefect; this package uses only numpy and ``cryptography``.
"""

from fl_components.secure_aggregation.protocol.context import RoundContext, default_threshold
from fl_components.secure_aggregation.protocol.coordinator import (
    AggregateResult,
    SecAggCoordinator,
    SecAggStats,
)
from fl_components.secure_aggregation.protocol.errors import (
    ContextMismatchError,
    KeyFileError,
    MalformedMessageError,
    ProtocolError,
    ReconstructionError,
    ShareDecryptionError,
    SignatureError,
    ThresholdNotMetError,
    UnknownSiteError,
    UnsafeRequestError,
)
from fl_components.secure_aggregation.protocol.keys import PublicKeys, Registry, SiteKeys
from fl_components.secure_aggregation.protocol.messages import (
    MaskedUpdate,
    Stage,
    UnmaskRequest,
    UnmaskResponse,
)
from fl_components.secure_aggregation.protocol.participant import SecAggParticipant
from fl_components.secure_aggregation.protocol.quantize import Quantizer

__all__ = [
    "AggregateResult",
    "ContextMismatchError",
    "KeyFileError",
    "MalformedMessageError",
    "MaskedUpdate",
    "ProtocolError",
    "PublicKeys",
    "Quantizer",
    "ReconstructionError",
    "Registry",
    "RoundContext",
    "SecAggCoordinator",
    "SecAggParticipant",
    "SecAggStats",
    "ShareDecryptionError",
    "SignatureError",
    "SiteKeys",
    "Stage",
    "ThresholdNotMetError",
    "UnknownSiteError",
    "UnmaskRequest",
    "UnmaskResponse",
    "UnsafeRequestError",
    "default_threshold",
]
