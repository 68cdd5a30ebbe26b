"""Record-level DP at a site: DP-SGD through Opacus, checked against the site's ledger.

DP-SGD: Abadi et al. 2016, "Deep Learning with Differential Privacy", CCS, arXiv:1607.00133
(Algorithm 1: clip each per-sample gradient to C, add N(0, sigma^2 C^2) to their sum), with
Poisson sampling of each batch (rate q) as Opacus does it; Opacus: Yousefpour et al. 2021,
arXiv:2109.12298.

Randomness: Opacus's ``secure_mode`` needs torchcsprng, whose last release is from 2021 and
does not build against current torch. The batch sampling and the gradient noise therefore
come from torch generators (not cryptographically secure), each seeded per round with 63
bits from the operating system's CSPRNG (:mod:`secrets`), never from the run's public seed:
whoever knows the config cannot regenerate the noise.
"""

from __future__ import annotations

import math
import secrets
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fl_components.config import FederationConfig, PrivacyConfig, TrainingConfig
from fl_components.data.types import Split
from fl_components.errors import ConfigError
from fl_components.parameters import NDArrays
from fl_components.privacy.ledger import (
    RDP_ORDERS,
    LedgerEntry,
    PrivacyLedger,
    RoundAlreadyCharged,
    default_delta,
)
from fl_components.privacy.releases import (
    keep_release,
    load_release,
    parameters_digest,
    release_path,
)
from fl_components.round.types import LocalUpdate, SiteInstructions
from fl_components.site.training import (
    TrainingRun,
    as_dataset,
    local_step_count,
    local_train,
    make_loader,
    make_optimizer,
    train_epochs,
)
from fl_components.task.protocol import CLASSIFICATION, BoundTask

# Installed once for the process: Opacus's hooks make torch warn at every step, and
# warnings.catch_warnings is not thread-safe (sites train on concurrent threads).
warnings.filterwarnings("ignore", message=r".*Full backward hook is firing.*")
warnings.filterwarnings("ignore", message=r".*Secure RNG turned off.*")
warnings.filterwarnings("ignore", message=r".*Using a non-full backward hook.*")

# Layers torch's ExpandedWeights computes per-sample gradients for (torch.nn.utils.
# _expanded_weights); a model made only of these (plus parameter-free layers) runs in 'ew'.
_EW_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Embedding,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)


@dataclass(frozen=True)
class RecordPlan:
    """One round of DP-SGD at a site, fixed before training.

    Attributes
    ----------
    noise_multiplier : float
        sigma.
    sample_rate : float
        q = 1 / batches per epoch (Poisson sampling).
    steps : int
        Optimizer steps this round (``training.local_steps``, else epochs x batches).
    delta : float
        Delta the site's epsilon is reported at.
    max_grad_norm : float
        Per-sample clip norm C.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    max_grad_norm: float


def validate_model(model: nn.Module, *, where: str = "model.kind") -> None:
    """Reject a model Opacus cannot train privately, with Opacus's own reasons.

    ``where`` names what built the model (``model.kind``, or ``task 'pkg.mod:attr'``).

    Raises
    ------
    ConfigError
        Listing each offending layer as Opacus's ``ModuleValidator`` reports it.
    """
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        reasons = "; ".join(str(error) for error in errors)
        raise ConfigError(
            f"{where}: Opacus cannot train this model with DP-SGD (privacy.mode record or "
            f"both): {reasons}. Fix the model: build it with GroupNorm (or LayerNorm) in "
            "place of BatchNorm, or return opacus.validators.ModuleValidator.fix(model) from "
            "build_model, which replaces BatchNorm with GroupNorm; or set privacy.mode to "
            "'participant'"
        )


def choose_grad_sample_mode(model: nn.Module, requested: str) -> str:
    """The per-sample gradient engine: ``requested``, or the fastest the model supports.

    Measured on this project's MLP (opacus 1.6, torch 2.13 CPU), cost per epoch against
    non-private training: ew 2.8x, ghost 3.4x, hooks 4.4x, functorch 5.6x. 'auto' takes
    'ew' when every layer with parameters is one ExpandedWeights handles, else 'hooks'
    (which covers every layer Opacus validates).
    """
    if requested != "auto":
        return requested
    with_parameters = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    if all(isinstance(m, _EW_LAYERS) for m in with_parameters):
        return "ew"
    return "hooks"


def plan_round(
    *, examples: int, privacy: PrivacyConfig, training: TrainingConfig, rounds: int
) -> RecordPlan:
    """Fix sigma, q and the step count of one round at a site with ``examples`` records.

    With ``privacy.target_epsilon``, sigma is the one Opacus's ``get_noise_multiplier``
    picks so that all ``rounds`` rounds together spend ``target_epsilon``.
    """
    if examples < 1:
        raise ConfigError("a site with no training examples cannot run DP-SGD")
    batch_size = min(training.batch_size, examples)
    batches = math.ceil(examples / batch_size)
    sample_rate = 1.0 / batches  # what Opacus's make_private uses: 1 / len(data_loader)
    steps = local_step_count(training, batches)
    delta = privacy.delta if privacy.delta is not None else default_delta(examples)
    if privacy.noise_multiplier is not None:
        sigma = privacy.noise_multiplier
    elif privacy.target_epsilon is not None:
        from opacus.accountants.utils import get_noise_multiplier

        # the RDP search minimises over the same orders the ledger uses (no end-of-range
        # warning, and the sigma found is the one the ledger's bound is tight for)
        orders = {"alphas": list(RDP_ORDERS)} if privacy.accountant == "rdp" else {}
        sigma = float(
            get_noise_multiplier(
                target_epsilon=privacy.target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps * rounds,
                accountant=privacy.accountant,
                **orders,
            )
        )
    else:
        raise ConfigError("record-level DP needs privacy.noise_multiplier or target_epsilon")
    return RecordPlan(
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps=steps,
        delta=delta,
        max_grad_norm=privacy.max_grad_norm,
    )


def _secret_generator() -> torch.Generator:
    return torch.Generator().manual_seed(secrets.randbits(63))


@dataclass(frozen=True)
class DPSGD:
    """DP-SGD around a plain training run: Opacus's per-sample clipping, noise, Poisson batches.

    A :class:`fl_components.site.training.TrainingWrapper`: the run keeps its model, optimizer
    and objective. The strategy's terms (FedProx's proximal gradient, SCAFFOLD's
    correction) depend on no record, so they are added to the gradient *after* Opacus
    clipped and noised it (in the optimizer's step hook, between the noise and the step):
    post-processing, which costs no privacy, and the same objective as plain training.
    Opacus's own accountant is not used: the site's ledger accounts the planned steps,
    whether or not a Poisson batch came out empty.
    """

    plan: RecordPlan
    grad_sample_mode: str

    def wrap(self, run: TrainingRun) -> TrainingRun:
        """The private run: Poisson batches from a secret generator, per-sample clipping."""
        from opacus import PrivacyEngine

        validate_model(run.model, where=_where(run))
        batch_size = run.loader.batch_size or 1
        # the plain loader's order comes from the public seed; Poisson sampling must not
        loader = DataLoader(
            run.loader.dataset, batch_size=batch_size, shuffle=True, generator=_secret_generator()
        )
        engine = PrivacyEngine(accountant="rdp")
        criterion: Any = run.loss_fn if run.loss_fn is not None else nn.CrossEntropyLoss()
        if self.grad_sample_mode == "ghost":  # Opacus sets the criterion's reduction
            criterion = (run.task if run.task is not None else CLASSIFICATION).loss_module()
            if criterion is None:
                raise ConfigError(
                    f"{_where(run)}: privacy.grad_sample_mode 'ghost' needs the task's loss "
                    "as a torch.nn.Module with a 'reduction' attribute (such as "
                    "nn.CrossEntropyLoss()); make the task's loss one, or set "
                    "privacy.grad_sample_mode: auto"
                )
        wrapped = engine.make_private(
            module=run.model,
            optimizer=run.optimizer,
            criterion=criterion,
            data_loader=loader,
            noise_multiplier=self.plan.noise_multiplier,
            max_grad_norm=self.plan.max_grad_norm,
            poisson_sampling=True,
            noise_generator=_secret_generator(),
            grad_sample_mode=self.grad_sample_mode,
        )
        if len(wrapped) == 4:  # ghost clipping also wraps the loss
            private_model, private_optimizer, criterion, private_loader = wrapped
        else:
            private_model, private_optimizer, private_loader = wrapped
        if run.adjust_gradients is not None:
            _after_noise(private_optimizer, run.adjust_gradients)

        def close() -> None:
            if hasattr(private_model, "_close"):
                private_model._close()  # remove Opacus's hooks so the model can be reused

        return TrainingRun(
            model=private_model,
            optimizer=private_optimizer,
            loader=private_loader,
            loss_fn=criterion,
            adjust_gradients=None,  # runs inside the private step, after the noise
            close=close,
            task=run.task,
        )


def _where(run: TrainingRun) -> str:
    if run.task is None or run.task.spec.startswith("builtin:"):
        return "model.kind"
    return f"task {run.task.spec!r}"


def _after_noise(optimizer: Any, adjust: Callable[[], None]) -> None:
    """Run ``adjust`` in Opacus's step hook: after clip, noise and scaling, before the step."""
    previous = optimizer.step_hook

    def hook(private: Any) -> None:
        if previous is not None:
            previous(private)
        adjust()

    optimizer.step_hook = hook


def dp_train(
    model: nn.Module,
    train: Split,
    training: TrainingConfig,
    *,
    plan: RecordPlan,
    grad_sample_mode: str,
    device: torch.device,
) -> float:
    """Plain local SGD on ``train`` under :class:`DPSGD`; return the last epoch's mean loss.

    The model is trained in place (its parameters end at θ_k). The same loop as every
    site's training (:func:`fl_components.site.training.train_epochs`), for benchmarks and tests
    that need no strategy.
    """
    run = DPSGD(plan, grad_sample_mode).wrap(
        TrainingRun(
            model=model,
            optimizer=make_optimizer(model, training),
            loader=make_loader(train, batch_size=training.batch_size, seed=0),
        )
    )
    try:
        return train_epochs(
            run.model,
            run.loader,
            run.optimizer,
            epochs=training.epochs,
            device=device,
            loss_fn=run.loss_fn,
            steps=training.local_steps,
        )
    finally:
        if run.close is not None:
            run.close()


def private_local_train(
    model: nn.Module,
    global_parameters: NDArrays,
    train: Split | Dataset[Any],
    config: FederationConfig,
    *,
    site: str,
    folder: Path,
    round_num: int,
    seed: int,
    instructions: SiteInstructions | None = None,
    mlflow_run_id: str | None = None,
    flow_run_id: str | None = None,
    task: BoundTask | None = None,
    task_identity: dict[str, str] | None = None,
) -> LocalUpdate:
    """The site's local training (the strategy's objective) under DP-SGD, once the ledger agrees.

    :func:`fl_components.site.training.local_train` with :class:`DPSGD` around it (FedProx's and
    SCAFFOLD's terms apply; ``seed`` never seeds the secret batch sampling or noise). The ledger
    in ``folder`` is checked before any record is touched (:func:`_check_budget`), charged
    after (:class:`_Charge`); ``extra`` holds :func:`_privacy_figures`.
    """
    started = time.perf_counter()
    _refuse_unprivatized_loss(instructions, site=site, round_num=round_num)
    train = as_dataset(train)
    plan = _plan(train, config)
    ledger = PrivacyLedger.open(folder, site=site, accountant=config.privacy.accountant)
    charge = _Charge(
        federation=config.name,
        round_num=round_num,
        digest=parameters_digest(global_parameters),
        runs=(mlflow_run_id, flow_run_id),
        task_identity=task_identity,
    )
    if (charged := charge.entry_in(ledger)) is not None:  # paid for already: never train twice
        return _released_again(ledger, charged, folder=folder, delta=plan.delta)
    spent_before = _check_budget(ledger, plan, max_epsilon=config.privacy.max_epsilon)
    mode = choose_grad_sample_mode(model, config.privacy.grad_sample_mode)
    trained = local_train(
        model,
        global_parameters,
        train,
        config.training,
        site=site,
        round_num=round_num,
        seed=seed,
        instructions=instructions,
        folder=folder,
        wrapper=DPSGD(plan, mode),
        task=task,
    )
    kept = charge.record_in(ledger, plan, max_epsilon=config.privacy.max_epsilon)
    figures = _privacy_figures(
        ledger, plan, max_epsilon=config.privacy.max_epsilon, mode=mode, spent_before=spent_before
    )
    update = replace(trained, seconds=time.perf_counter() - started, extra=figures)
    if kept is not None:  # charged: what a repeated request for this round gets back
        keep_release(folder, kept, update)
    return update


def _plan(train: Dataset[Any], config: FederationConfig) -> RecordPlan:
    """The round's DP-SGD plan for a site of ``len(train)`` records."""
    return plan_round(
        examples=len(train),  # type: ignore[arg-type]
        privacy=config.privacy,
        training=config.training,
        rounds=config.rounds,
    )


@dataclass(frozen=True)
class _Charge:
    """The key of one round's ledger entry, and what the entry names besides.

    ``runs``: the MLflow run and the Prefect flow run that spend it (when the caller knows
    them: an auditor can then follow each entry); ``task_identity`` (spec, sha256): the
    code that trained on the records. ``digest``: the global model trained from.
    """

    federation: str
    round_num: int
    digest: str
    runs: tuple[str | None, str | None]
    task_identity: dict[str, str] | None

    def entry_in(self, ledger: PrivacyLedger) -> LedgerEntry | None:
        """The entry charged already for this (run, round, model), if any."""
        return ledger.entry_for(
            federation=self.federation,
            mlflow_run_id=self.runs[0],
            round_num=self.round_num,
            parameters_digest=self.digest,
        )

    def record_in(
        self, ledger: PrivacyLedger, plan: RecordPlan, *, max_epsilon: float | None
    ) -> str | None:
        """Write the round just trained into ``ledger``; return where its release is kept.

        None without an MLflow run to key the release by.
        """
        mlflow_run_id, flow_run_id = self.runs
        release = None
        if mlflow_run_id:
            release = release_path(
                federation=self.federation,
                mlflow_run_id=mlflow_run_id,
                round_num=self.round_num,
                digest=self.digest,
            )
        identity = self.task_identity or {}
        ledger.record(
            federation=self.federation,
            round_num=self.round_num,
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=plan.steps,
            delta=plan.delta,
            max_epsilon=max_epsilon,
            mlflow_run_id=mlflow_run_id,
            flow_run_id=flow_run_id,
            release=release,
            parameters_digest=self.digest,
            task=identity.get("spec"),
            task_sha256=identity.get("sha256"),
        )
        return release


def _refuse_unprivatized_loss(
    instructions: SiteInstructions | None, *, site: str, round_num: int
) -> None:
    """Refuse q-FedAvg's F_k(θ_t): a loss on the training records DP-SGD would not privatize."""
    if instructions is not None and instructions.report_initial_loss:
        raise ConfigError(
            f"site {site!r} refuses round {round_num}: q-FedAvg asks for the loss of the "
            "global model on its training records, which DP-SGD does not privatize "
            "(privacy.mode record/both); use another strategy or privacy.mode participant"
        )


def _check_budget(ledger: PrivacyLedger, plan: RecordPlan, *, max_epsilon: float | None) -> float:
    """Refuse a round that would pass ``max_epsilon``; return the epsilon spent before it.

    Raises :class:`~fl_components.errors.BudgetExhaustedError` before any record is touched.
    """
    spent_before = ledger.epsilon(plan.delta)
    ledger.check_round(
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=plan.steps,
        delta=plan.delta,
        max_epsilon=max_epsilon,
    )
    return spent_before


def _privacy_figures(
    ledger: PrivacyLedger,
    plan: RecordPlan,
    *,
    max_epsilon: float | None,
    mode: str,
    spent_before: float,
) -> dict[str, float]:
    """The round's privacy figures for ``LocalUpdate.extra``, after the ledger was charged.

    epsilon (the site's total, all runs), epsilon_round, delta, noise_multiplier,
    sample_rate, steps, max_grad_norm, grad_sample_mode (its code), and max_epsilon and
    remaining: both left out when the site's budget is unlimited.
    """
    epsilon = ledger.epsilon(plan.delta)
    figures = {
        "epsilon": epsilon,
        "epsilon_round": epsilon - spent_before,
        "delta": plan.delta,
        "noise_multiplier": plan.noise_multiplier,
        "sample_rate": plan.sample_rate,
        "steps": float(plan.steps),
        "max_grad_norm": plan.max_grad_norm,
        "grad_sample_mode": float(_MODE_CODES[mode]),
    }
    return figures | _budget_figures(max_epsilon, ledger.remaining(plan.delta))


def _budget_figures(max_epsilon: float | None, remaining: float | None) -> dict[str, float]:
    """``max_epsilon`` and ``remaining`` for ``LocalUpdate.extra``: absent when unlimited."""
    figures = {}
    if max_epsilon is not None:
        figures["max_epsilon"] = max_epsilon
    if remaining is not None:
        figures["remaining"] = remaining
    return figures


def _released_again(
    ledger: PrivacyLedger, charged: LedgerEntry, *, folder: Path, delta: float
) -> LocalUpdate:
    """The release kept for a charged (run, round, model), unchanged; or decline the round.

    Re-sending an output already charged is post-processing (no new cost); training again
    from the same model would be a second release under the same key, so without the kept
    release the site declines.

    Raises
    ------
    RoundAlreadyCharged
        When no release of the request is kept (removed, or lost in a crash).
    """
    kept = None if charged.release is None else load_release(folder, charged.release)
    spent = ledger.epsilon(delta)
    if kept is None:
        raise RoundAlreadyCharged(
            f"site {ledger.site!r} declines round {charged.round} of run "
            f"{charged.mlflow_run_id}: its privacy ledger charged a release for this (run, "
            "round, global model) already and keeps no copy of it; training again would "
            f"release the same records twice (epsilon spent {spent:.3f}). The round goes on "
            "without this site",
            site=ledger.site,
            spent=spent,
            after=spent,
        )
    remaining = ledger.remaining(delta)
    # the ledger's figures as of now; the update itself is the one released. A release kept
    # before 'unlimited' was written as an absent key carries -1.0 there: dropped on load.
    extra = {
        key: value
        for key, value in kept.extra.items()
        if not (key in ("max_epsilon", "remaining") and value < 0)
    }
    extra = {**extra, "epsilon": spent}
    extra.pop("remaining", None)
    return replace(kept, extra=extra | _budget_figures(None, remaining))


# LocalUpdate.extra holds floats only; the mode travels as its code
GRAD_SAMPLE_MODES = ("ew", "ghost", "hooks", "functorch")
_MODE_CODES = {mode: index for index, mode in enumerate(GRAD_SAMPLE_MODES)}
