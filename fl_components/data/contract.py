"""The data contract: what every site's files must hold, read by name.

Declared once in the config's ``data`` section (:class:`~fl_components.config.DataConfig`)
and checked by every site at every job (:mod:`fl_components.data.site_files`); see
docs/how-to/your-data.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DataContract:
    """What every site's files must hold, read by name (``data`` section of the config).

    ``columns``: the feature columns in the model's input order, or None for "every column
    but the label and ``drop``, sorted by name" (so column order never matters either way).
    ``label_map``: label value as text -> class index, or None when labels are indices.
    ``categorical``: column -> levels, one-hot encoded in that order. ``delimiter`` and
    ``decimal``: the CSV dialect.
    """

    label_column: str = "label"
    columns: tuple[str, ...] | None = None
    drop: tuple[str, ...] = ()
    label_map: tuple[tuple[str, int], ...] | None = None
    categorical: tuple[tuple[str, tuple[str, ...]], ...] = ()
    n_classes: int | None = None
    delimiter: str = ","
    decimal: str = "."

    @classmethod
    def of(cls, data: Any) -> DataContract:
        """The contract a config's ``data`` section (a ``DataConfig``) declares."""
        label_map = data.label_map
        return cls(
            label_column=data.label_column,
            columns=data.columns,
            drop=tuple(data.drop),
            label_map=tuple(sorted(label_map.items())) if label_map is not None else None,
            categorical=tuple(sorted(data.categorical.items())),
            n_classes=data.n_classes,
            delimiter=data.delimiter,
            decimal=data.decimal,
        )

    @property
    def levels(self) -> dict[str, tuple[str, ...]]:
        """Categorical column -> its levels."""
        return dict(self.categorical)

    def model_inputs(self, columns: tuple[str, ...]) -> tuple[str, ...]:
        """Names of the model's inputs for these columns (a categorical one per level)."""
        levels = self.levels
        names: list[str] = []
        for column in columns:
            names.extend(
                [f"{column}={v}" for v in levels[column]] if column in levels else [column]
            )
        return tuple(names)
