"""The federation's configuration: one pydantic model tree, the only way settings enter.

Flows take :class:`FederationConfig` as their parameter, so the Prefect UI renders it as a
form and validates it before a run is submitted; ``fedpipe run FILE.yaml`` loads the same
model from YAML. Every validation error names the field, the value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fl_components.errors import ConfigError

BundledDataset = Literal["digits", "breast_cancer", "wine", "synthetic"]
Partitioner = Literal["iid", "dirichlet", "shards", "quantity_skew"]
ModelKind = Literal["logreg", "mlp", "cnn"]
OptimizerKind = Literal["sgd", "adam"]
StrategyKind = Literal[
    "fedavg", "fedavgm", "fedprox", "scaffold", "fedadagrad", "fedadam", "fedyogi", "qfedavg"
]
AggregatorKind = Literal["mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan"]
ADAPTIVE_RULES = ("fedadagrad", "fedadam", "fedyogi")
BackendKind = Literal["local", "work-pool"]
RunnerKind = Literal["thread", "ray", "dask"]
InitFrom = Literal["fresh", "champion", "run"]
# 'package.module:attribute': a module importable at the site and an object in it
TaskSpec = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$",
        max_length=200,
    ),
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FederationScaling(_Section):
    """The federation's per-input mean and std, from the run's statistics stage.

    Formed from the sites' summed statistics (count, sum, sum of squares per input), under
    secure aggregation when it is on; every site standardizes with these same values.
    """

    mean: tuple[float, ...] = Field(min_length=1, description="Per model input: the mean.")
    std: tuple[float, ...] = Field(
        min_length=1, description="Per model input: the (population) std; 0 for a constant one."
    )
    rows: int = Field(ge=1, description="Training rows the statistics were formed from.")
    secure: bool = Field(
        default=False, description="Whether the sites' sums were combined by secure aggregation."
    )
    epsilon: float | None = Field(
        default=None,
        description="Epsilon each site spent on its noised statistics (None: no noise).",
    )

    @model_validator(mode="after")
    def _same_width(self) -> FederationScaling:
        if len(self.mean) != len(self.std):
            raise ValueError(
                f"data.scaling has {len(self.mean)} means but {len(self.std)} stds; give one "
                "of each per model input (or remove data.scaling: the run computes it)"
            )
        if any(s < 0 or s != s for s in self.std) or any(m != m for m in self.mean):
            raise ValueError("data.scaling.std must be >= 0 and no value NaN")
        return self


class StatisticsPrivacy(_Section):
    """Privacy rules of the federated statistics (``fedpipe stats``, ``data.scale: federation``).

    A minimum cohort (sites and rows) below which the statistics are refused, and optional
    differential privacy: each site clips its values to public bounds and adds Gaussian
    noise, calibrated to one release of its (count, sum, sum of squares, class counts), to
    its own statistics before they leave it; the epsilon is charged to its privacy ledger.
    """

    min_sites: int = Field(
        default=2,
        ge=1,
        description="Fewest sites the statistics are formed from (with one, they are that "
        "site's own); secure aggregation needs 3 in any case.",
    )
    min_rows: int = Field(
        default=0, ge=0, description="Fewest training rows in all; fewer and they are refused."
    )
    epsilon: float | None = Field(
        default=None,
        gt=0,
        description="Each site's epsilon for one release of its statistics (Gaussian "
        "mechanism); None: no noise. Needs clip or bounds.",
    )
    delta: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Delta of that release; None: a power of ten below 1/(10 n), n the "
        "site's rows.",
    )
    clip: float | None = Field(
        default=None, gt=0, description="Public bound B: every value is clipped to [-B, B]."
    )
    bounds: dict[str, tuple[float, float]] = Field(
        default={},
        description="Public bounds per model input, {column: [low, high]}; overrides clip there.",
    )

    @model_validator(mode="after")
    def _bounded(self) -> StatisticsPrivacy:
        if self.epsilon is not None and self.clip is None and not self.bounds:
            raise ValueError(
                "data.statistics_privacy.epsilon is set but no bounds are: noise needs public "
                "bounds on the values; set data.statistics_privacy.clip (every value to "
                "[-clip, clip]) or data.statistics_privacy.bounds per column"
            )
        for column, (low, high) in self.bounds.items():
            if not low < high:
                raise ValueError(
                    f"data.statistics_privacy.bounds[{column!r}] is [{low}, {high}]; give "
                    "[low, high] with low < high"
                )
        return self


class DataConfig(_Section):
    """Where the sites' data comes from and how a bundled set is split among them."""

    source: Literal["bundled", "site_files"] = Field(
        default="bundled",
        description="'bundled': split a scikit-learn set among generated sites; "
        "'site_files': every site brings its own file (see sites[].data_path).",
    )
    dataset: BundledDataset = Field(
        default="digits",
        description="Bundled scikit-learn set, or 'synthetic': the FedProx paper's "
        "Synthetic(alpha, beta), one generated device per site (partitioner unused).",
    )
    synthetic_alpha: float = Field(
        default=1.0, ge=0, le=100, description="synthetic: model heterogeneity α (0 = same W)."
    )
    synthetic_beta: float = Field(
        default=1.0, ge=0, le=100, description="synthetic: feature heterogeneity β."
    )
    partitioner: Partitioner = Field(default="dirichlet", description="How labels are split.")
    alpha: float = Field(default=0.5, gt=0, description="Dirichlet concentration (lower = skew).")
    shards_per_site: int = Field(default=2, ge=1, description="Labels per site for 'shards'.")
    quantity_sigma: float = Field(
        default=1.0, gt=0, description="Log-normal sigma of site sizes for 'quantity_skew'."
    )
    test_fraction: float = Field(
        default=0.2, gt=0, lt=1, description="Central test split held out before partitioning."
    )
    site_test_fraction: float = Field(
        default=0.2, gt=0, lt=1, description="Each site's held-out split for federated eval."
    )
    label_column: str = Field(default="label", description="Label column of CSV/Parquet files.")
    sites_dir: str = Field(
        default="sites",
        description="Generated site folders go to `<sites_dir>/<federation>/<site>`.",
    )
    n_features: int | None = Field(
        default=None, ge=1, description="Input width; required for site_files (bundled: known)."
    )
    n_classes: int | None = Field(
        default=None, ge=2, description="Number of classes; required for site_files."
    )
    scale: Literal["none", "site", "federation"] = Field(
        default="none",
        description="site_files: 'site' standardizes each site's features with the mean and "
        "std of its own training rows (applied to its test rows too); 'federation' with the "
        "federation's mean and std, formed before round 1 from the sites' summed statistics "
        "(under secure aggregation when it is on), the same at every site; 'none' uses them "
        "as they are (a site whose columns look unscaled logs a warning).",
    )
    scaling: FederationScaling | None = Field(
        default=None,
        description="data.scale 'federation': the federation's mean and std per model input. "
        "Unset: `fedpipe run` forms them before round 1 (see `fedpipe stats`); set, they are "
        "used as given (e.g. to reuse a champion's scaling).",
    )
    statistics_privacy: StatisticsPrivacy = Field(
        default_factory=StatisticsPrivacy,
        description="Privacy rules of the federated statistics: minimum cohort, optional DP noise.",
    )
    # The data contract (site_files): every site reads its files by name against it.
    columns: tuple[str, ...] | None = Field(
        default=None,
        description="site_files: the feature columns by name, in the model's input order; a "
        "site's files may hold them in any order. Unset: every column but label_column and "
        "drop, sorted by name (a run pins the list it found at every site).",
    )
    drop: tuple[str, ...] = Field(
        default=(),
        description="site_files: columns of the sites' files that are not features (IDs, "
        "dates, free text); ignored wherever they appear.",
    )
    label_map: dict[str, int] | None = Field(
        default=None,
        description="site_files: label values as written in the files -> class index, e.g. "
        "{'no': 0, 'yes': 1} (quote yes/no: YAML reads them as booleans). Unset: labels "
        "must already be class indices 0..n_classes-1.",
    )
    categorical: dict[str, tuple[str, ...]] = Field(
        default={},  # pydantic copies it per instance; a plain default shows in the schema
        description="site_files: column -> its levels; one-hot encoded in this order at every "
        "site (columns `<column>=<level>`); a value outside the levels is refused.",
    )
    delimiter: str = Field(
        default=",", min_length=1, max_length=1, description="CSV field separator, e.g. ';'."
    )
    decimal: Literal[".", ","] = Field(default=".", description="CSV decimal mark: '.' or ','.")
    allow_unloadable_sites: bool = Field(
        default=False,
        description="site_files: a run whose check finds sites that cannot load their files "
        "starts anyway (those sites drop out of every round); by default it stops before "
        "round 1 with the check's table.",
    )

    @field_validator("label_map", mode="before")
    @classmethod
    def _label_keys_are_text(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for key in value:
                if isinstance(key, bool):
                    raise ValueError(
                        f"key {key!r} was read as a boolean (YAML turns unquoted yes/no/true/"
                        "false into booleans); quote the label values, e.g. "
                        "{'no': 0, 'yes': 1}"
                    )
            return {str(key): index for key, index in value.items()}
        return value

    @model_validator(mode="before")
    @classmethod
    def _widths_from_contract(cls, data: Any) -> Any:
        """Fill n_features from declared columns and n_classes from label_map when unset."""
        if not isinstance(data, dict):
            return data
        filled = dict(data)
        columns, levels = filled.get("columns"), filled.get("categorical") or {}
        if filled.get("n_features") is None and columns and isinstance(levels, dict):
            widths = [len(levels[c]) if c in levels else 1 for c in columns]
            filled["n_features"] = sum(widths)
        label_map = filled.get("label_map")
        if filled.get("n_classes") is None and isinstance(label_map, dict) and label_map:
            indices = [v for v in label_map.values() if isinstance(v, int)]
            if indices:
                filled["n_classes"] = max(indices) + 1
        return filled

    @model_validator(mode="after")
    def _contract_consistent(self) -> DataConfig:
        # a value other than the default, not a field present: a dumped config (every field
        # written out, as a Prefect deployment stores it) must load again
        contract = ("columns", "drop", "label_map", "categorical", "delimiter", "decimal")
        set_fields = {
            name
            for name in contract
            if getattr(self, name)
            != type(self).model_fields[name].get_default(call_default_factory=True)
        }
        if self.source == "bundled" and set_fields:
            first = sorted(set_fields)[0]
            raise ValueError(
                f"data.{first} is set but data.source is 'bundled' (the bundled sets have no "
                f"files to read by name); remove data.{first} or set data.source: site_files"
            )
        if self.delimiter == self.decimal:
            raise ValueError(
                f"data.delimiter and data.decimal are both {self.delimiter!r}; a CSV with a "
                "decimal comma separates fields with ';' (set data.delimiter: ';')"
            )
        if self.columns is not None:
            self._check_columns(self.columns)
        if self.categorical and self.columns is None:
            raise ValueError(
                f"data.categorical ({', '.join(self.categorical)}) needs data.columns: list the "
                "feature columns, so every site one-hot encodes the same inputs in one order"
            )
        if self.label_column in self.drop:
            raise ValueError(
                f"data.drop names the label column {self.label_column!r}; remove it from drop"
            )
        for column, levels in self.categorical.items():
            if len(levels) < 2 or len(set(levels)) != len(levels):
                raise ValueError(
                    f"data.categorical.{column} needs two or more distinct levels "
                    f"(got {list(levels)})"
                )
        if self.label_map is not None:
            self._check_label_map(self.label_map)
        return self

    def _check_columns(self, columns: tuple[str, ...]) -> None:
        """data.columns: each named once, none also the label or dropped, widths that add up."""
        named = {"label_column": (self.label_column,), "drop": self.drop}
        repeated = sorted({c for c in columns if columns.count(c) > 1})
        if repeated:
            raise ValueError(f"data.columns names {repeated} more than once; list each once")
        for field, names in named.items():
            both = sorted(set(names) & set(columns))
            if both:
                raise ValueError(
                    f"data.columns and data.{field} both name {both}; a column is a "
                    f"feature or the {field.replace('_', ' ')}, not both"
                )
        unknown = sorted(set(self.categorical) - set(columns))
        if unknown:
            raise ValueError(
                f"data.categorical names {unknown}, which are not in data.columns; add "
                "them to data.columns or remove them from data.categorical"
            )
        width = sum(len(self.categorical.get(c, (0,))) for c in columns)
        if self.n_features is not None and self.n_features != width:
            raise ValueError(
                f"data.n_features is {self.n_features} but data.columns gives {width} "
                "model inputs (categorical columns count one per level); remove "
                "data.n_features or make it match"
            )

    def _check_label_map(self, label_map: dict[str, int]) -> None:
        """data.label_map: not empty, indices inside 0..n_classes-1, every class given."""
        if not label_map:
            raise ValueError("data.label_map is empty; map each label value to a class index")
        n = self.n_classes
        bad = {k: v for k, v in label_map.items() if v < 0 or (n is not None and v >= n)}
        if bad:
            raise ValueError(
                f"data.label_map maps {bad} outside 0..{(n or 1) - 1}; class indices run "
                "0..n_classes-1 (raise data.n_classes or fix the map)"
            )
        unused = sorted(set(range(n or 0)) - set(label_map.values()))
        if unused:
            raise ValueError(
                f"data.label_map gives no label value for class(es) {unused} of "
                f"data.n_classes ({n}); map a value to each class or lower data.n_classes"
            )


class SiteConfig(_Section):
    """One site of the federation."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
    data_path: str | None = Field(
        default=None,
        description="Folder with the site's own `train.<ext>` and `test.<ext>` "
        "(.npz, .csv or .parquet). Only for data.source = 'site_files'.",
    )
    work_pool: str | None = Field(
        default=None, description="Prefect work pool of this site (work-pool backend)."
    )


class ParticipationConfig(_Section):
    """How many sites take part in each round."""

    fraction: float = Field(default=1.0, gt=0, le=1, description="Share of sites per round.")
    min_participants: int = Field(default=2, ge=1, description="Fewer than this aborts a round.")
    round_retries: int = Field(
        default=0,
        ge=0,
        le=10,
        description="A round that ends below min_participants (sites down, late or failing; "
        "not budget declines) is tried again this many times, after a backoff that doubles "
        "from retry_backoff_seconds, before the run fails. Each attempt is accounted.",
    )
    retry_backoff_seconds: float = Field(default=30.0, ge=0, le=3600)
    over_select: int = Field(
        default=0,
        ge=0,
        le=10_000,
        description="Extra sites selected each round beyond the fraction's count; the round "
        "closes once that count of valid updates is in (on the work-pool backend without "
        "waiting for the rest, whose runs are cancelled), the others are 'surplus' "
        "(Bonawitz et al. 2019). Not with participant-level DP: it changes the sampling rate.",
    )


class ModelConfig(_Section):
    """The model every site trains."""

    kind: ModelKind = "mlp"
    hidden: tuple[int, ...] = Field(default=(128,), description="MLP hidden layer widths.")

    @field_validator("hidden")
    @classmethod
    def _positive_widths(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(width < 1 for width in value):
            raise ValueError(f"every hidden width must be >= 1 (got {list(value)})")
        return value


Precision = Literal["fp32", "bf16", "fp16"]


class TrainingConfig(_Section):
    """Local training at each site."""

    epochs: int = Field(
        default=5, ge=1, le=1000, description="Local passes over the site's training rows."
    )
    local_steps: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Instead of epochs: this many local optimizer steps (batches) per round at "
        "every site, whatever its size (FLamby's and SCAFFOLD's protocol); a site cycles "
        "through its rows as often as needed. Unset: epochs x the site's batches.",
    )
    batch_size: int = Field(default=32, ge=1, le=65536)
    lr: float = Field(default=0.05, gt=0, le=10)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    optimizer: OptimizerKind = "sgd"
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="'auto' picks CUDA when a GPU is present."
    )
    precision: Precision = Field(
        default="fp32",
        description="Mixed precision around the task's step: 'bf16' or 'fp16' run the "
        "forward pass and the loss under torch.autocast (fp16 with a gradient scaler); the "
        "weights, the optimizer and the update stay fp32. Not with record-level DP.",
    )
    loader_workers: int = Field(
        default=0,
        ge=0,
        le=64,
        description="Worker processes loading each site's batches (0: in the training "
        "process). Workers are seeded from the round's seed, so a run repeats; batches are "
        "copied into pinned memory when training on CUDA.",
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="torch's CPU threads per simulated site (sites that train side by side "
        "in one process: the embedded run and the bare loop). Unset: the cores shared out "
        "among the sites, at least 1. A deployed site's own process keeps torch's default.",
    )

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainingConfig:
        # compared with the default, not "was it given": a dumped config must load again
        default = type(self).model_fields["epochs"].default
        if self.local_steps is not None and self.epochs != default:
            raise ValueError(
                f"training.epochs ({self.epochs}) and training.local_steps ({self.local_steps}) "
                "are both set; a round runs one or the other: remove training.epochs (or "
                "training.local_steps)"
            )
        return self


def default_server_lr(rule: str) -> float:
    """The server step η a rule takes when ``strategy.server_lr`` is unset."""
    return 0.1 if rule in ADAPTIVE_RULES else 1.0


class StrategyConfig(_Section):
    """How the coordinator combines updates and moves the global model.

    ``name`` picks the server rule, ``aggregator`` how the round's updates are combined
    before it steps (the mean, or a robust rule), ``norm_bound`` bounds each update first.
    A knob set for a rule that does not use it is an error, never silently ignored.
    """

    name: StrategyKind = Field(
        default="fedavg",
        description="Server rule: fedavg, fedavgm (server momentum), fedprox (proximal term), "
        "scaffold (control variates), fedadagrad / fedadam / fedyogi (adaptive server), "
        "qfedavg (fairness).",
    )
    aggregator: AggregatorKind = Field(
        default="mean",
        description="How updates are combined: mean (example-weighted), or robust: median, "
        "trimmed_mean, krum, multi_krum, bulyan (these need updates in the clear).",
    )
    server_lr: float | None = Field(
        default=None,
        gt=0,
        le=10,
        description="Server step η on the combined update; unset = the rule's own: 1.0, or 0.1 "
        "for fedadagrad / fedadam / fedyogi (resolved when the run starts, logged as "
        "strategy.effective.server_lr). Not used by qfedavg.",
    )
    server_momentum: float = Field(
        default=0.9, ge=0, lt=1, description="fedavgm: momentum β of the server step."
    )
    proximal_mu: float = Field(
        default=0.01, ge=0, le=100, description="fedprox: μ of the proximal term (μ/2)‖θ−θ_t‖²."
    )
    beta1: float = Field(
        default=0.9, ge=0, lt=1, description="fedadagrad/fedadam/fedyogi: first moment β₁."
    )
    beta2: float = Field(default=0.99, ge=0, lt=1, description="fedadam/fedyogi: second moment β₂.")
    tau: float = Field(
        default=1e-3, gt=0, le=1, description="fedadagrad/fedadam/fedyogi: adaptivity τ."
    )
    q: float = Field(default=1.0, ge=0, le=50, description="qfedavg: fairness q (0 = mean).")
    trim_beta: float = Field(
        default=0.1, gt=0, lt=0.5, description="trimmed_mean: share β cut at each end."
    )
    byzantine_f: int = Field(
        default=1, ge=0, le=1000, description="krum/multi_krum/bulyan: attackers f tolerated."
    )
    multi_krum_m: int | None = Field(
        default=None, ge=1, description="multi_krum: updates m averaged; null = n − f."
    )
    norm_bound: float | None = Field(
        default=None,
        gt=0,
        description="L2 bound M on each update (Sun et al. 2019); null = none. Works under "
        "secure aggregation (the site bounds its own update).",
    )
    robust_memory_mb: float | None = Field(
        default=4096,
        gt=0,
        description="median/trimmed_mean/krum/multi_krum/bulyan hold every update at once "
        "(n sites x d parameters x 8 bytes); a round that would need more MiB than this is "
        "refused before it is dispatched; null = no bound. The mean streams and ignores it.",
    )

    @property
    def effective_server_lr(self) -> float:
        """``server_lr``, or the rule's default when it is null (resolved here, at run time).

        Never filled into the config: a deployment stores the config as set, and a default
        frozen for one rule would be carried into another by a form that posts every field.
        """
        if self.server_lr is not None:
            return self.server_lr
        return default_server_lr(self.name)

    def _moved(self, knob: str) -> bool:
        """True when ``knob`` differs from its default (a dumped and reloaded config passes)."""
        return bool(getattr(self, knob) != type(self).model_fields[knob].default)

    @model_validator(mode="after")
    def _knobs_match_rule(self) -> StrategyConfig:
        owners = {
            "server_momentum": ("fedavgm",),
            "proximal_mu": ("fedprox",),
            "beta1": ADAPTIVE_RULES,
            "beta2": ("fedadam", "fedyogi"),
            "tau": ADAPTIVE_RULES,
            "q": ("qfedavg",),
        }
        for knob, rules in owners.items():
            if self._moved(knob) and self.name not in rules:
                raise ValueError(
                    f"strategy.{knob} is set ({getattr(self, knob)}) but strategy.name is "
                    f"{self.name!r}, which does not use it; set strategy.name to one of "
                    f"{', '.join(rules)} or remove strategy.{knob}"
                )
        aggregator_knobs = {
            "trim_beta": ("trimmed_mean",),
            "byzantine_f": ("krum", "multi_krum", "bulyan"),
            "multi_krum_m": ("multi_krum",),
        }
        for knob, aggregators in aggregator_knobs.items():
            if self._moved(knob) and self.aggregator not in aggregators:
                raise ValueError(
                    f"strategy.{knob} is set ({getattr(self, knob)}) but strategy.aggregator is "
                    f"{self.aggregator!r}; set strategy.aggregator to one of "
                    f"{', '.join(aggregators)} or remove strategy.{knob}"
                )
        if self.name == "qfedavg" and self.server_lr is not None:
            raise ValueError(
                f"strategy.server_lr is set ({self.server_lr}) but strategy.name 'qfedavg' "
                "steps by its own rule (L = 1/training.lr); remove strategy.server_lr"
            )
        if self.name == "qfedavg" and self.aggregator != "mean":
            raise ValueError(
                f"strategy.name 'qfedavg' weighs updates by loss itself; strategy.aggregator "
                f"{self.aggregator!r} cannot combine with it: set strategy.aggregator: mean"
            )
        return self


class TrackingConfig(_Section):
    """MLflow tracking."""

    tracking_uri: str = Field(
        default="sqlite:///mlflow/mlflow.db",
        description="MLflow tracking URI; the default store lives under mlflow/.",
    )
    artifact_root: str = Field(default="mlflow/artifacts", description="Artifacts folder.")
    register_model: bool = Field(default=True, description="Register the final model.")


class PromotionConfig(_Section):
    """Guard rails before a new model becomes the registry's champion.

    A model that fails one is registered as challenger, with the reason; set its
    ``allow_*`` to promote it anyway (the reason still names the rail it failed).
    """

    allow_diverged: bool = Field(
        default=False,
        description="Promote even if the run diverged (a non-finite loss, or a final loss "
        "over max_loss_growth times the starting model's).",
    )
    allow_below_baseline: bool = Field(
        default=False,
        description="Promote even if the federated accuracy does not beat always predicting "
        "the most frequent class on the same sites.",
    )
    allow_partial: bool = Field(
        default=False,
        description="Promote even if the final evaluation left some of the sites out.",
    )
    max_loss_growth: float = Field(
        default=10.0,
        gt=1.0,
        description="A final loss above this multiple of the starting model's is divergence.",
    )

    @property
    def allowed(self) -> frozenset[str]:
        """The guard rails the operator overrode (``diverged``, ``below_baseline``, ...)."""
        rails = ("diverged", "below_baseline", "partial")
        return frozenset(r for r in rails if getattr(self, f"allow_{r}"))


PrivacyMode = Literal["off", "record", "participant", "both"]
AccountantKind = Literal["rdp", "prv", "gdp"]
GradSampleMode = Literal["auto", "ew", "ghost", "hooks", "functorch"]


class PrivacyConfig(_Section):
    """Differential privacy: record-level DP-SGD at each site, participant-level DP-FedAvg.

    ``record`` runs Opacus DP-SGD at every site and enforces each site's ``max_epsilon``
    from its own ledger; ``participant`` clips each update to ``clip_norm`` and adds Gaussian
    noise of std ``client_noise_multiplier * clip_norm`` to their sum; ``both`` does both.
    """

    mode: PrivacyMode = Field(default="off", description="off | record | participant | both.")
    accountant: AccountantKind = Field(default="rdp", description="Opacus accountant.")
    delta: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Target delta; None picks a power of ten below 1/(10 n) "
        "(n: the site's training examples, or the number of sites for participant-level).",
    )
    # record-level (DP-SGD at each site)
    noise_multiplier: float | None = Field(
        default=None, gt=0, description="DP-SGD noise multiplier sigma (record-level)."
    )
    target_epsilon: float | None = Field(
        default=None,
        gt=0,
        description="Epsilon the whole run may spend at each site; Opacus picks sigma for "
        "rounds x epochs (record-level; instead of noise_multiplier).",
    )
    max_grad_norm: float = Field(default=1.0, gt=0, description="Per-sample clip norm C.")
    grad_sample_mode: GradSampleMode = Field(
        default="auto",
        description="Per-sample gradients: 'auto' picks the fastest the model supports "
        "(ew 2.8x < ghost 3.4x < hooks 4.4x < functorch 5.6x of non-private cost).",
    )
    max_epsilon: float | None = Field(
        default=None,
        gt=0,
        description="Per-site budget across rounds and runs (the site's ledger); "
        "None = unlimited. A round that would pass it is declined.",
    )
    # participant-level (DP-FedAvg)
    clip_norm: float = Field(default=1.0, gt=0, description="L2 clip of each site's update.")
    client_noise_multiplier: float = Field(
        default=1.0, gt=0, description="z: noise std on the sum is z * clip_norm."
    )
    adaptive_clipping: bool = Field(
        default=False, description="Adapt clip_norm to a quantile of update norms (Andrew+ 2021)."
    )
    target_quantile: float = Field(
        default=0.5, gt=0, lt=1, description="Quantile of update norms adaptive clipping tracks."
    )
    clip_learning_rate: float = Field(
        default=0.2, gt=0, le=10, description="Step of the geometric clip-norm update."
    )
    sampling: Literal["random", "fixed"] = Field(
        default="random",
        description="'random': each site drawn independently with probability q = "
        "participation.fraction (Poisson, secret CSPRNG draw), so client sampling amplifies "
        "privacy; 'fixed': selection is public, q = 1 over the rounds a site is selected in.",
    )
    max_client_epsilon: float | None = Field(
        default=None,
        gt=0,
        description="Participant-level budget of a model across the runs it descends from "
        "(the coordinator's federation ledger); None = unlimited. A round past it is refused.",
    )

    @property
    def record_level(self) -> bool:
        """True when sites run DP-SGD."""
        return self.mode in ("record", "both")

    @property
    def participant_level(self) -> bool:
        """True when updates are clipped and noised (DP-FedAvg)."""
        return self.mode in ("participant", "both")

    @model_validator(mode="after")
    def _one_noise_source(self) -> PrivacyConfig:
        if self.record_level:
            if self.noise_multiplier is None and self.target_epsilon is None:
                raise ValueError(
                    f"privacy.mode is {self.mode!r}: set privacy.noise_multiplier "
                    "(e.g. 1.1) or privacy.target_epsilon (e.g. 3)"
                )
            if self.noise_multiplier is not None and self.target_epsilon is not None:
                raise ValueError(
                    f"privacy.noise_multiplier ({self.noise_multiplier}) and "
                    f"privacy.target_epsilon ({self.target_epsilon}) are both set; keep one"
                )
        if (
            self.target_epsilon is not None
            and self.max_epsilon is not None
            and self.target_epsilon > self.max_epsilon
        ):
            raise ValueError(
                f"privacy.target_epsilon ({self.target_epsilon}) exceeds privacy.max_epsilon "
                f"({self.max_epsilon}); every round would be declined, lower target_epsilon"
            )
        return self


class RunnerConfig(_Section):
    """Where the local backend's site tasks run: threads here, or a Ray or Dask cluster.

    ``thread`` (default) runs them on this process's threads; ``ray`` and ``dask`` hand
    them to prefect-ray's RayTaskRunner or prefect-dask's DaskTaskRunner (extras
    ``fedpipe[ray]``, ``fedpipe[dask]``), on a cluster at ``address`` or, without one, a
    local cluster started for the run. Deployed sites run on their work pools instead.
    """

    kind: RunnerKind = Field(default="thread", description="thread | ray | dask.")
    address: str | None = Field(
        default=None,
        description="Cluster to join: ray 'ray://HOST:10001' or 'auto', dask "
        "'tcp://HOST:8786'; None starts a local cluster (thread: unused).",
    )
    workers: int | None = Field(
        default=None,
        ge=1,
        description="thread: pool size (None: on backend local, 1 for a model under 200k "
        "parameters, whose sites' steps are too short to run side by side under Python's GIL; "
        "else Prefect's default); local ray: CPUs; local dask: worker processes (None: the "
        "cluster's default).",
    )
    cohort_threshold: int = Field(
        default=16,
        ge=1,
        description="A wave of more site jobs than this runs as cohorts (2 per worker) of "
        "sites per task instead of one task per site: at 100+ simulated sites the per-task "
        "cost dominates. Each site's outcome stays in the round's artifact.",
    )

    @model_validator(mode="after")
    def _address_fits_kind(self) -> RunnerConfig:
        if self.kind == "thread" and self.address is not None:
            raise ValueError(
                f"runner.address ({self.address!r}) needs runner.kind 'ray' or 'dask'; "
                "the thread runner has no cluster, remove runner.address"
            )
        if self.address is not None and self.workers is not None:
            raise ValueError(
                f"runner.workers ({self.workers}) sizes a local cluster only; with "
                f"runner.address ({self.address!r}) the cluster has its own workers, "
                "remove runner.workers"
            )
        return self


class DeploymentConfig(_Section):
    """The work-pool backend: where the global model is handed over, how long to wait."""

    exchange_dir: str = Field(
        default="state/exchange",
        description="Shared folder for global-model files (sites read them by path and hash).",
    )
    participant_deployment: str = Field(
        default="federated-participant",
        description="Flow name of the participant deployments (`<flow>/<site>` per site).",
    )
    timeout_seconds: float = Field(
        default=300, gt=0, le=86400, description="A site with no result by then drops out."
    )
    poll_interval: float = Field(
        default=0.5, gt=0, le=60, description="Seconds between checks of a site's flow run."
    )


class SecureAggregationConfig(_Section):
    """Secure aggregation (Bonawitz et al. 2017; SecAgg+ with ``neighbours``).

    With ``enabled``, each site masks its update and the coordinator learns only their sum.
    Updates are weighted for FedAvg at the site before masking: Δ_k is scaled by
    ``min(n_k, max_weight) / max_weight`` (as Flower's SecAgg+ does), and the unmasked sum is
    divided by the sum of those weights.
    """

    enabled: bool = Field(default=False, description="Mask updates; the coordinator sees the sum.")
    threshold: int | None = Field(
        default=None,
        ge=1,
        description="t: minimum survivors and unmask responses; None = a majority, "
        "floor(g/2) + 1, of the group a site shares with (g: the round's participants, or "
        "a site and its neighbours).",
    )
    neighbours: int | None = Field(
        default=None, ge=1, description="k for SecAgg+ (sparse graph); None = every pair."
    )
    clip_range: float = Field(
        default=1.0, gt=0, description="Each weighted update value is clipped to ±clip_range."
    )
    bits: int | None = Field(
        default=None, ge=1, le=32, description="Fixed-point bits; None = 32 - ceil(log2 n)."
    )
    max_weight: int = Field(
        default=1000,
        ge=1,
        description="Examples at which a site's FedAvg weight saturates (weight = "
        "min(n_k, max_weight) / max_weight).",
    )
    registry: str | None = Field(
        default=None,
        description="Public-key registry JSON; None = `<sites_dir>/<federation>/registry.json`.",
    )


CompressionMethod = Literal["none", "qsgd", "top_k", "random_k"]
DownloadKind = Literal["full", "delta"]


class CompressionConfig(_Section):
    """Fewer bytes on the wire: compressed updates up, model deltas down.

    ``qsgd``: stochastic b-bit quantization (Alistarh et al. 2017); under secure aggregation,
    b-bit fixed point packed in Z_2^(b + ceil(log2 n)). ``top_k``: the largest
    ``fraction`` of values with their indices (Stich et al. 2018; not under secure
    aggregation). ``random_k``: the same ``fraction`` of coordinates at every site of a round
    (Konecny et al. 2016); under secure aggregation only those are masked and sent, as b-bit
    fixed point.
    """

    method: CompressionMethod = Field(
        default="none", description="none | qsgd | top_k | random_k (update upload)."
    )
    bits: int = Field(
        default=8,
        ge=2,
        le=16,
        description="Bits per value: QSGD's b in the clear; under secure aggregation the "
        "fixed-point bits before ceil(log2 n) bits of headroom.",
    )
    bucket_size: int = Field(
        default=512, ge=1, le=1 << 20, description="QSGD: values sharing one scale."
    )
    fraction: float = Field(
        default=0.1, gt=0, le=1, description="top_k / random_k: fraction of values sent."
    )
    error_feedback: bool = Field(
        default=True,
        description="top_k / random_k: carry what was not sent to the next round "
        "(residual kept in the site's folder).",
    )
    residual_max_age: int = Field(
        default=1,
        ge=1,
        description="Rounds a residual stays valid; a site that skipped more starts from zero.",
    )
    download: DownloadKind = Field(
        default="full",
        description="'delta': send the change against the model the site holds (checked by "
        "SHA-256); sites without it get the full model.",
    )
    download_bits: int | None = Field(
        default=None, ge=2, le=16, description="QSGD bits for the download delta; None = float32."
    )

    @property
    def enabled(self) -> bool:
        """True when updates are compressed."""
        return self.method != "none"


class FederationConfig(_Section):
    """A whole federation: sites, rounds, model, training, strategy, tracking."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")] = "digits-demo"
    sites: tuple[SiteConfig, ...] = Field(
        default_factory=lambda: tuple(SiteConfig(name=f"site-{i:02d}") for i in range(10)),
        min_length=1,
    )
    rounds: int = Field(default=20, ge=1, le=10000)
    participation: ParticipationConfig = ParticipationConfig()
    data: DataConfig = DataConfig()
    task: TaskSpec | None = Field(
        default=None,
        description="The user's task, as 'package.module:attribute', importable where each "
        "site runs (installed there; never a file path). It builds the model, loads the "
        "site's datasets, and gives the loss and metrics; unset: the built-in task of "
        "model.kind on the data section's tabular files.",
    )
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    strategy: StrategyConfig = StrategyConfig()
    tracking: TrackingConfig = TrackingConfig()
    promotion: PromotionConfig = PromotionConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    backend: BackendKind = Field(default="local", description="Where participants run.")
    deployment: DeploymentConfig = DeploymentConfig()
    runner: RunnerConfig = RunnerConfig()
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()
    compression: CompressionConfig = CompressionConfig()
    init_from: InitFrom = Field(
        default="fresh", description="Start fresh, from the registry's champion, or a run."
    )
    init_run_id: str | None = Field(default=None, description="MLflow run id for init_from=run.")
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> FederationConfig:
        _check_sites(self)
        _check_privacy(self)
        _check_site_files(self)
        _check_secure_aggregation(self)
        _check_runner(self)
        conflict = strategy_conflict(self)
        if conflict:
            raise ValueError(conflict)
        _check_compression(self)
        if self.init_from == "run" and not self.init_run_id:
            raise ValueError("init_from is 'run' but init_run_id is empty; set init_run_id")
        return self

    @property
    def site_names(self) -> tuple[str, ...]:
        """Names of all sites, in config order."""
        return tuple(site.name for site in self.sites)


def strategy_conflict(config: FederationConfig) -> str | None:
    """Why the strategy cannot run with the federation's privacy / secure aggregation / size.

    Robust aggregators, SCAFFOLD and q-FedAvg need each site's result in the clear (or, for
    SCAFFOLD, a second secure sum the secure round does not compute); secure aggregation
    shows the coordinator only the sum, DP-FedAvg only the noised sum. The robust rules
    also need enough updates in the smallest round (``participation.min_participants``).
    """
    strategy = config.strategy
    clear = strategy.aggregator != "mean" or strategy.name in ("scaffold", "qfedavg")
    what = (
        f"strategy.aggregator {strategy.aggregator!r}"
        if strategy.aggregator != "mean"
        else f"strategy.name {strategy.name!r}"
    )
    fix = "set strategy.aggregator: mean and a strategy.name other than scaffold/qfedavg"
    if clear and config.secure_aggregation.enabled:
        return (
            f"{what} needs each site's update in the clear, but secure_aggregation.enabled is "
            f"true (the coordinator sees only the sum); {fix} (strategy.norm_bound still "
            "works: sites bound their own update), or set secure_aggregation.enabled: false"
        )
    if strategy.name == "qfedavg" and config.privacy.record_level:
        return (
            "strategy.name 'qfedavg' weighs each site by F_k(θ_t), the global model's loss on "
            "the site's training records, which the site would send without noise: DP-SGD "
            f"(privacy.mode {config.privacy.mode!r}) does not cover it. Use another strategy "
            "(fedavg, fedprox, scaffold, ...) or set privacy.mode: off"
        )
    if clear and config.privacy.participant_level:
        return (
            f"{what} cannot run with privacy.mode {config.privacy.mode!r} (DP-FedAvg noises "
            f"the sum of clipped updates); {fix}, or set privacy.mode to 'record' or 'off'"
        )
    smallest = config.participation.min_participants
    needed = {"krum": 2, "multi_krum": 2, "bulyan": 4}.get(strategy.aggregator)
    if needed and smallest < needed * strategy.byzantine_f + 3:
        return (
            f"strategy.aggregator {strategy.aggregator!r} with strategy.byzantine_f = "
            f"{strategy.byzantine_f} needs every round to have >= {needed}f + 3 = "
            f"{needed * strategy.byzantine_f + 3} updates, but participation.min_participants "
            f"is {smallest}; raise min_participants or lower byzantine_f"
        )
    if strategy.multi_krum_m is not None and strategy.multi_krum_m > smallest:
        return (
            f"strategy.multi_krum_m ({strategy.multi_krum_m}) exceeds "
            f"participation.min_participants ({smallest}); lower multi_krum_m or leave it null"
        )
    return None


def format_validation_error(error: ValidationError, *, source: str) -> str:
    """Turn pydantic's error into lines naming field, value and what is allowed."""
    lines = [f"{source}: {error.error_count()} invalid setting(s)"]
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "literal_error":
            allowed = item.get("ctx", {}).get("expected", "")
            message = f"must be one of {allowed}"
        elif item["type"] == "extra_forbidden":
            message = "is not a known setting (check its spelling and section)"
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {field}: {message}{shown}")
    return "\n".join(lines)


def config_from_dict(raw: dict[str, Any], *, source: str = "config") -> FederationConfig:
    """Validate a plain mapping, raising :class:`ConfigError` with a readable message."""
    try:
        return FederationConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source=source)) from None


def parse_yaml(text: str, *, source: str) -> Any:
    """``yaml.safe_load`` of a config's text; anything it cannot read is a :class:`ConfigError`.

    Besides :class:`yaml.YAMLError`, PyYAML raises ``ValueError`` for a date that does not
    exist (``seed: 2020-02-30``) and ``RecursionError`` for very deep nesting.
    """
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {error}") from None
    except ValueError as error:
        raise ConfigError(
            f"{source}: not valid YAML: {error} (an unquoted date that does not exist?); "
            "quote the value"
        ) from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from None


def load_config(path: str | Path) -> FederationConfig:
    """Load and validate a federation config from a YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; see examples/ for templates")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {error.start}); save the config as UTF-8"
        ) from None
    raw = parse_yaml(text, source=str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return config_from_dict(raw, source=str(path))


def flatten_config(config: BaseModel, prefix: str = "") -> dict[str, str]:
    """Flatten the config into ``section.field -> str`` pairs (MLflow params)."""
    flat: dict[str, str] = {}
    for key, value in config.model_dump(mode="json").items():
        _flatten_into(flat, f"{prefix}{key}", value)
    return flat


def _flatten_into(flat: dict[str, str], key: str, value: Any) -> None:
    if isinstance(value, dict):
        for sub_key, sub_value in value.items():
            _flatten_into(flat, f"{key}.{sub_key}", sub_value)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        flat[f"{key}.count"] = str(len(value))
        for index, item in enumerate(value):
            _flatten_into(flat, f"{key}.{index}", item)
    else:
        flat[key] = str(value)


def _check_sites(config: FederationConfig) -> None:
    """Site names unique; enough sites for participation.min_participants."""
    names = [site.name for site in config.sites]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"sites: names must be unique (repeated: {', '.join(duplicates)})")
    if config.participation.min_participants > len(config.sites):
        raise ValueError(
            f"participation.min_participants ({config.participation.min_participants}) "
            f"exceeds the number of sites ({len(config.sites)}); lower it or add sites"
        )


def _check_privacy(config: FederationConfig) -> None:
    """Privacy modes against the training and sampling settings they rely on."""
    if config.privacy.record_level and config.training.precision != "fp32":
        raise ValueError(
            f"training.precision is {config.training.precision!r} and privacy.mode is "
            f"{config.privacy.mode!r}: Opacus clips and noises per-sample gradients in "
            "fp32 and does not support autocast or a gradient scaler (a loss scale would "
            "scale the clipping bound); set training.precision: fp32, or a privacy.mode "
            "without record-level DP ('off' or 'participant')"
        )
    if config.participation.over_select and config.privacy.participant_level:
        raise ValueError(
            f"participation.over_select ({config.participation.over_select}) changes how "
            "many sites each round samples, and so the sampling rate q the participant-"
            "level DP accountant assumes; set it to 0, or raise participation.fraction"
        )


def _check_site_files(config: FederationConfig) -> None:
    """The data section: site files with their sizes, and the scaling of features."""
    if config.task is not None and config.data.source == "site_files":
        raise ValueError(
            f"task is {config.task!r} and data.source is 'site_files': a task loads each "
            "site's data itself (its load_data); remove data.source, or remove task to "
            "train the built-in model.kind on the site files"
        )
    if config.data.source == "site_files":
        missing = [s.name for s in config.sites if s.data_path is None]
        if missing:
            raise ValueError(
                "data.source is 'site_files' but these sites have no data_path: "
                f"{', '.join(missing)}; set sites[].data_path"
            )
    if config.data.source == "site_files" and (
        config.data.n_features is None or config.data.n_classes is None
    ):
        raise ValueError(
            "data.source is 'site_files': set data.n_features and data.n_classes "
            "(the coordinator never opens a site's files to find them)"
        )
    if config.data.scale != "none" and config.data.source != "site_files":
        raise ValueError(
            f"data.scale is {config.data.scale!r} but data.source is 'bundled': the bundled "
            "sets are already scaled to [0, 1] (and the central test split would not be "
            "standardized); set data.scale: none or data.source: site_files"
        )
    scaling = config.data.scaling
    if scaling is not None and config.data.scale != "federation":
        raise ValueError(
            f"data.scaling is set but data.scale is {config.data.scale!r}; set data.scale: "
            "federation, or remove data.scaling"
        )
    width = config.data.n_features
    if scaling is not None and width is not None and len(scaling.mean) != width:
        raise ValueError(
            f"data.scaling has {len(scaling.mean)} means but the model has {width} inputs "
            "(data.n_features); remove data.scaling so the run forms it again"
        )
    if config.data.scale == "federation" and scaling is None and config.backend != "local":
        raise ValueError(
            "data.scale is 'federation' with backend 'work-pool': the statistics stage "
            "runs only over local site folders so far; give data.scaling (the mean and "
            "std `fedpipe stats` prints), or set data.scale: site"
        )
    if config.data.source == "site_files" and "dataset" in config.data.model_fields_set:
        raise ValueError(
            f"data.dataset ({config.data.dataset!r}) is set but data.source is 'site_files'; "
            "remove data.dataset or set data.source: bundled"
        )


def _check_secure_aggregation(config: FederationConfig) -> None:
    """Secure aggregation's group sizes, and what it hides from the coordinator."""
    secagg = config.secure_aggregation
    if secagg.enabled and len(config.sites) < 3:
        raise ValueError(
            f"secure_aggregation.enabled with {len(config.sites)} site(s): with two "
            "participants each learns the other's update from the sum; secure aggregation "
            "needs at least 3 sites (add sites or set secure_aggregation.enabled: false)"
        )
    if secagg.enabled and secagg.threshold is not None and secagg.threshold < 3:
        raise ValueError(
            f"secure_aggregation.threshold ({secagg.threshold}) lets a sum of fewer than 3 "
            "updates be unmasked, and with two each survivor learns the other's update; "
            "set it to 3 or more, or null (a majority)"
        )
    if secagg.enabled and secagg.neighbours is not None and secagg.neighbours < 2:
        raise ValueError(
            f"secure_aggregation.neighbours ({secagg.neighbours}) makes groups of fewer "
            "than 3 sites, whose sums tell each member the other's update; set it to 2 or "
            "more (an even k such as 6), or null"
        )
    if secagg.enabled and secagg.threshold is not None and secagg.threshold > len(config.sites):
        raise ValueError(
            f"secure_aggregation.threshold ({secagg.threshold}) exceeds the number of "
            f"sites ({len(config.sites)}); lower it or set it to null for a majority"
        )
    if secagg.enabled and config.privacy.participant_level and config.privacy.adaptive_clipping:
        raise ValueError(
            "privacy.adaptive_clipping needs each update's norm, which secure aggregation "
            "hides from the coordinator; set privacy.adaptive_clipping: false or "
            "secure_aggregation.enabled: false"
        )


def _check_runner(config: FederationConfig) -> None:
    """The runner against the backend."""
    if config.backend == "work-pool" and config.runner.kind != "thread":
        raise ValueError(
            f"runner.kind is {config.runner.kind!r} but backend is 'work-pool': sites run "
            "on their own work pools; set runner.kind: thread or backend: local"
        )


def _check_compression(config: FederationConfig) -> None:
    """Refuse compression settings that break secure aggregation or DP's sensitivity."""
    compression, secagg, privacy = config.compression, config.secure_aggregation, config.privacy
    if not compression.enabled:
        return
    if secagg.enabled and compression.method == "top_k":
        raise ValueError(
            "compression.method 'top_k' picks different coordinates at each site, which "
            "secure_aggregation.enabled cannot sum; use compression.method 'random_k' (shared "
            "coordinates) or 'qsgd', or disable secure aggregation"
        )
    if secagg.enabled and secagg.bits is not None:
        raise ValueError(
            f"secure_aggregation.bits ({secagg.bits}) and compression.method "
            f"({compression.method!r}) both set the fixed-point bits; set "
            "secure_aggregation.bits: null and use compression.bits"
        )
    # DP-SGD noise is inside training, so compressing its output is post-processing. In the
    # clear, DP-FedAvg clips each *decoded* update at the coordinator before noising the
    # sum: compression comes before the clip and cannot change the sensitivity.
    if privacy.participant_level and secagg.enabled:
        raise ValueError(
            f"compression.method {compression.method!r} with secure_aggregation.enabled and "
            f"privacy.mode={privacy.mode!r}: the site clips before compressing (error feedback "
            "would push the norm past privacy.clip_norm) and the distributed noise needs the "
            "headroom of Z_2^32 that packing removes; set compression.method: none, or "
            "privacy.mode: record, or disable secure aggregation (the coordinator then clips "
            "the decoded update)"
        )
