"""What the coordinator tells a training site about compressing its update.

Carried in a site job (:class:`~fl_components.round.types.SiteJob`); the site applies it
with :func:`fl_components.compression.site.compress_local_update`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fl_components.compression.encoded import CompressionError
from fl_components.config import CompressionConfig


@dataclass(frozen=True)
class CompressionInstruction:
    """How one site compresses its update in one round.

    Attributes
    ----------
    config : CompressionConfig
        The federation's ``compression`` section.
    run_id, round : str, int
        Bind shared random-k coordinates and the residual to the round.
    """

    config: CompressionConfig
    run_id: str
    round: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (for a flow parameter or a site job)."""
        return {"config": self.config.model_dump(), "run_id": self.run_id, "round": self.round}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionInstruction:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(
                config=CompressionConfig.model_validate(data["config"]),
                run_id=str(data["run_id"]),
                round=int(data["round"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise CompressionError(f"malformed compression instruction: {error}") from None
