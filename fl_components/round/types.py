"""The round's shared vocabulary: what a site is asked, what it answers, the server's state.

Every package that takes part in a round names its data with these types (the engine, the
strategies, the site's jobs, the wire messages, the backends), so none of them imports
another's implementation to name a result: the site's torch training, the server-side
strategies and the engine depend on this module, never on each other for a type.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import numpy as np

from fl_components.compression.download import DownloadKind, ModelDownload
from fl_components.compression.encoded import EncodedUpdate
from fl_components.compression.instruction import CompressionInstruction
from fl_components.errors import ConfigError
from fl_components.parameters import NDArrays
from fl_components.privacy.accounting import ClientRound
from fl_components.privacy.dp_fedavg import DPAggregate
from fl_components.secure_aggregation.protocol import RoundContext


@dataclass(frozen=True)
class Metrics:
    """Loss and accuracy of a model on one split.

    ``label_counts``: the split's rows per class (empty from a site too old to send them),
    what the promotion's majority-class baseline is computed from.
    """

    loss: float
    accuracy: float
    examples: int
    label_counts: tuple[int, ...] = ()


@dataclass(frozen=True)
class LocalUpdate:
    """What a participant returns: its update, its weight, and how training went."""

    site: str
    round: int
    delta: NDArrays
    num_examples: int
    train_loss: float
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)
    control_delta: NDArrays | None = None  # SCAFFOLD: Δc_i = c_i⁺ − c_i
    initial_loss: float | None = None  # q-FedAvg: F_k(θ_t) on the training split


@dataclass(frozen=True)
class ServerState:
    """Everything a run needs to continue from the end of round ``round``.

    Attributes
    ----------
    round : int
        Rounds completed (0 before the first).
    parameters : NDArrays
        The global model θ_t (float32 arrays, state_dict order).
    strategy_state : Mapping[str, NDArrays]
        The strategy's own arrays: server-optimizer moments (``m``, ``v``), server momentum,
        SCAFFOLD's server control variate ``c``. Keyed by name.
    clip_norm : float or None
        The participant-level clip norm in force (adaptive clipping moves it:
        :func:`fl_components.privacy.participant_round.next_clip_norm`).
    accountant_history : tuple of ClientRound
        This run's participant-level rounds charged so far, in order, each with its attempt
        key: what the participant-level accountant composes (with the rounds of the runs the
        model descends from, which the federation ledger holds). Charged write-ahead, when a
        round begins (:mod:`fl_components.privacy.participant_state`).
    begun_rounds : Mapping[int, ClientRound]
        Rounds charged when they began and not accounted yet, by round: accounting such a
        round does not charge it again. Empty between rounds.
    rng_state : Mapping[str, Any] or None
        numpy ``bit_generator.state`` of the coordinator's reproducible generator.
    """

    round: int
    parameters: NDArrays
    strategy_state: Mapping[str, NDArrays] = field(default_factory=dict)
    clip_norm: float | None = None
    accountant_history: tuple[ClientRound, ...] = ()
    begun_rounds: Mapping[int, ClientRound] = field(default_factory=dict)
    rng_state: Mapping[str, Any] | None = None

    def evolve(self, **changes: Any) -> ServerState:
        """A new state with ``changes`` applied (states are never mutated)."""
        return replace(self, **changes)

    def state_dict(self) -> dict[str, Any]:
        """A deep copy as plain types and numpy arrays (what a checkpoint stores)."""
        return {
            "round": self.round,
            "parameters": [np.array(p, dtype=np.float32, copy=True) for p in self.parameters],
            "strategy_state": {
                name: [np.array(a, copy=True) for a in arrays]
                for name, arrays in self.strategy_state.items()
            },
            "clip_norm": self.clip_norm,
            "accountant_history": [r.to_json() for r in self.accountant_history],
            "begun_rounds": {str(n): r.to_json() for n, r in self.begun_rounds.items()},
            "rng_state": copy.deepcopy(dict(self.rng_state)) if self.rng_state else None,
        }

    @classmethod
    def load_state_dict(cls, state: Mapping[str, Any]) -> ServerState:
        """Inverse of :meth:`state_dict` (copies, so the two never share an array)."""
        return cls(
            round=int(state["round"]),
            parameters=[np.array(p, dtype=np.float32, copy=True) for p in state["parameters"]],
            strategy_state={
                str(name): [np.array(a, copy=True) for a in arrays]
                for name, arrays in state.get("strategy_state", {}).items()
            },
            clip_norm=None if state.get("clip_norm") is None else float(state["clip_norm"]),
            accountant_history=tuple(_client_round(r) for r in state.get("accountant_history", ())),
            begun_rounds={
                int(n): ClientRound.from_json(r) for n, r in state.get("begun_rounds", {}).items()
            },
            rng_state=copy.deepcopy(dict(state["rng_state"])) if state.get("rng_state") else None,
        )


def _client_round(saved: Any) -> ClientRound:
    """A saved accountant step: a ClientRound's JSON, or ``[z, q, steps]`` (before keys)."""
    if isinstance(saved, Mapping):
        return ClientRound.from_json(saved)
    z, q, steps = saved
    return ClientRound(float(z), float(q), int(steps))


@dataclass(frozen=True)
class SiteInstructions:
    """What one site is sent with its training job, beyond the global model.

    Attributes
    ----------
    proximal_mu : float
        FedProx's μ: local training adds (μ/2)‖θ − θ_t‖² (0: plain local SGD).
    server_control : NDArrays or None
        SCAFFOLD's server control variate c; the site keeps its own c_i in its folder and
        returns Δc_i in :attr:`LocalUpdate.control_delta`.
    report_initial_loss : bool
        Report F_k(θ_t), the loss of the received model on the training split, in
        :attr:`LocalUpdate.initial_loss` (q-FedAvg weighs by it).
    """

    proximal_mu: float = 0.0
    server_control: NDArrays | None = None
    report_initial_loss: bool = False


@dataclass(frozen=True)
class AggregatedUpdate:
    """The round's combined update, as ``apply`` consumes it.

    Attributes
    ----------
    delta : NDArrays
        Δ̄: the direction the server rule steps along (a weighted mean for FedAvg, a robust
        estimate for the robust rules, the noised mean under DP-FedAvg).
    participants : int
        How many results went into it.
    control_delta : NDArrays or None
        SCAFFOLD: (1/|S|) Σ_i Δc_i.
    metrics : Mapping[str, float]
        The rule's own per-round figures (``strategy/...``), logged with the round.
    private : DPAggregate or None
        DP-FedAvg's record of the round (clip norm, noise std, update norms), to account.
    """

    delta: NDArrays
    participants: int
    control_delta: NDArrays | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    private: DPAggregate | None = None


class JobKind(StrEnum):
    """What a site is asked to do."""

    TRAIN = "train"
    MASK = "mask"  # secure aggregation, stage 1: train, then return the masked update
    UNMASK = "unmask"  # secure aggregation, stage 2: answer the unmask request
    EVALUATE = "evaluate"


class DropoutKind(StrEnum):
    """Why a selected site gave nothing usable this round."""

    DECLINED = "declined"  # its privacy budget would be exceeded (its ledger refused)
    BAD_DATA = "bad_data"  # its files are missing, unreadable or of the wrong shape
    TIMEOUT = "timeout"  # no answer before the deadline
    UNREACHABLE = "unreachable"  # no live worker / deployment for the site
    FAILED = "failed"  # any other error while it worked
    REJECTED = "rejected"  # its message failed a protocol check (signature, header, ...)
    INVALID = "invalid"  # its update failed validation (shape, dtype, NaN/Inf, norm)
    SURPLUS = "surplus"  # over-selected: the round closed with enough answers without it


@dataclass(frozen=True)
class Dropout:
    """A site that gave no usable result, the kind of reason and its text."""

    site: str
    kind: DropoutKind
    reason: str
    epsilon_spent: float | None = None  # DECLINED: the epsilon the site's ledger holds

    def __str__(self) -> str:
        return f"{self.kind}: {self.reason}"


@dataclass(frozen=True)
class SiteJob:
    """One site's work in one dispatch.

    Attributes
    ----------
    site, kind, round :
        Who, what, and for which round.
    parameters : NDArrays or None
        The model to train from or to score (None for ``unmask``). Backends that cross a
        trust boundary send a reference and hash of it, never the arrays. With a
        ``download`` it is the broadcast model B_r the download rebuilds at the site.
    seed : int
        The site's seed for this round (data order, local randomness).
    instructions : SiteInstructions
        What the strategy sends along (FedProx μ, SCAFFOLD's c, ...).
    evaluate_round : int or None
        ``train``/``mask``: first score ``parameters`` as the federated evaluation of round
        ``evaluate_round`` (the folded evaluation).
    secagg : object or None
        Secure aggregation's :class:`~fl_components.secure_aggregation.protocol.RoundContext`
        (``mask``/``unmask``).
    unmask_request : bytes or None
        ``unmask``: the coordinator's signed request.
    compression : CompressionInstruction or None
        ``train``: compress the update before it leaves the site (None: float32).
    download : ModelDownload or None
        How the model travels (``compression.download: delta``): a delta against the model
        the site holds, or the full model; None: ``parameters`` as they are.
    mlflow_run_id, flow_run_id : str
        The coordinator's MLflow run and Prefect flow run ('' when there is none): a site's
        privacy ledger records them with what the round spent.
    """

    site: str
    kind: JobKind
    round: int
    parameters: NDArrays | None = None
    seed: int = 0
    instructions: SiteInstructions = field(default_factory=SiteInstructions)
    evaluate_round: int | None = None
    secagg: RoundContext | None = None
    unmask_request: bytes | None = None
    compression: CompressionInstruction | None = None
    download: ModelDownload | None = None
    mlflow_run_id: str = ""
    flow_run_id: str = ""


@dataclass(frozen=True)
class SiteResult:
    """What a site answered: whichever of these its job asked for.

    ``upload`` is the compressed update as it travels (``update`` is its decoding);
    ``received`` which model download the site used (delta or full, when the job carried a
    ``download``); ``bytes_down`` what the job's model cost on the wire when the backend
    measured it (0: the engine counts it from the job).
    """

    site: str
    update: LocalUpdate | None = None  # train
    masked: MaskedContribution | None = None  # mask
    unmask_response: bytes | None = None  # unmask
    evaluation: Metrics | None = None  # evaluate, or the folded evaluation
    refusal: Dropout | None = None  # evaluated, then declined or failed to train
    bytes_up: int = 0  # what this answer cost on the wire (0: count the update's float32)
    upload: EncodedUpdate | None = None  # train, compressed: the message that travelled
    received: DownloadKind | None = None  # the model download used (delta, or full)
    bytes_down: int = 0  # what the job's model cost on the wire (0: the engine counts it)


@dataclass(frozen=True)
class MaskedContribution:
    """What a site returns from stage 1: the signed masked message and clear metadata.

    Attributes
    ----------
    site : str
        The sender.
    round : int
        The round.
    num_examples : int
        Training examples (clear, as in plaintext FedAvg).
    train_loss, seconds : float
        How local training went.
    extra : dict[str, float]
        Privacy report of the site (epsilon, ...), as in :class:`LocalUpdate`.
    payload : bytes
        ``MaskedUpdate.to_bytes()``: uint32 masked vector, encrypted shares, signature.
    """

    site: str
    round: int
    num_examples: int
    train_loss: float
    seconds: float
    payload: bytes | bytearray | memoryview
    extra: dict[str, float] = field(default_factory=dict)

    def report(self) -> LocalUpdate:
        """The metadata as a :class:`LocalUpdate` with an empty delta (nothing to unmask)."""
        return LocalUpdate(
            site=self.site,
            round=self.round,
            delta=[],
            num_examples=self.num_examples,
            train_loss=self.train_loss,
            seconds=self.seconds,
            extra=dict(self.extra),
        )

    def to_payload(self) -> dict[str, Any]:
        """JSON-safe form (the work-pool exchange)."""
        return {
            "stage": "mask",
            "site": self.site,
            "round": self.round,
            "num_examples": self.num_examples,
            "train_loss": float(self.train_loss),
            "seconds": float(self.seconds),
            "extra": {k: float(v) for k, v in self.extra.items()},
            "masked": base64.b64encode(self.payload).decode("ascii"),
        }

    @classmethod
    def from_payload(
        cls, payload: Mapping[str, Any], *, site: str, round_num: int
    ) -> MaskedContribution:
        """Inverse of :meth:`to_payload`, checking the stage, site and round."""
        header = {k: payload.get(k) for k in ("stage", "site", "round")}
        if header != {"stage": "mask", "site": site, "round": round_num}:
            raise ConfigError(
                f"site {site!r} round {round_num}: masked result header {header} does not "
                "match; discarded"
            )
        return cls(
            site=site,
            round=round_num,
            num_examples=int(payload["num_examples"]),
            train_loss=float(payload["train_loss"]),
            seconds=float(payload["seconds"]),
            extra={str(k): float(v) for k, v in payload.get("extra", {}).items()},
            payload=base64.b64decode(payload["masked"], validate=True),
        )
