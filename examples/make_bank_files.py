"""Write the four branches' own CSV files for examples/bank-branches-own-files.yaml.

Clean data, messy exports: branch-02's columns reversed, branch-03's test.csv in another
column order than its train.csv, branch-04 with a UTF-8 byte-order mark; every branch keeps
an ``account_no`` column (``data.drop``) and writes its label as yes/no (``data.label_map``).
With ``--broken``, the mistakes a site must refuse are added, one per branch: a stale
``train.npz`` beside branch-01's ``train.csv``, a renamed column at branch-02, a label outside
the map at branch-03, and branch-04's folder removed.

    python examples/make_bank_files.py [--broken] [--root sites/bank-own]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

COLUMNS = [
    "age", "income", "debt", "tenure", "cards", "loans", "late_12m", "late_24m",
    "utilization", "savings", "dependents", "region_risk",
]  # fmt: skip
SIZES = {"branch-01": 1200, "branch-02": 3600, "branch-03": 600, "branch-04": 1500}


def branch_frame(rows: int, *, rng: np.random.Generator, skew: float) -> pd.DataFrame:
    """One branch's applications: unscaled features, a yes/no label, account numbers."""
    x = rng.normal(size=(rows, len(COLUMNS)))
    weights = np.linspace(-1.5, 1.5, len(COLUMNS))
    score = x @ weights / 3 + skew + rng.normal(scale=0.5, size=rows)
    frame = pd.DataFrame(x * 10 + 50, columns=COLUMNS).round(3)
    frame.insert(0, "account_no", rng.choice(10**9, size=rows, replace=False))
    frame["defaulted"] = np.where(score > 0, "yes", "no")
    return frame


def write(root: Path, *, broken: bool, seed: int = 0) -> None:
    """Write every branch's train.csv and test.csv under ``root`` (and the broken variants)."""
    rng = np.random.default_rng(seed)
    for i, (name, rows) in enumerate(SIZES.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        frame = branch_frame(rows, rng=rng, skew=0.8 if name == "branch-03" else 0.0)
        cut = int(rows * 0.8)
        train, test = frame.iloc[:cut], frame.iloc[cut:]
        if name == "branch-02":
            train, test = train[train.columns[::-1]], test[test.columns[::-1]]
        if name == "branch-03":
            test = test[list(rng.permutation(test.columns))]
        encoding = "utf-8-sig" if name == "branch-04" else "utf-8"
        train.to_csv(folder / "train.csv", index=False, encoding=encoding)
        test.to_csv(folder / "test.csv", index=False, encoding=encoding)
        if not broken:
            continue
        if i == 0:
            stale = train.iloc[:500]
            np.savez(folder / "train.npz", x=stale[COLUMNS].to_numpy(), y=np.zeros(500))
        elif i == 1:
            for split in ("train", "test"):
                path = folder / f"{split}.csv"
                pd.read_csv(path).rename(columns={"debt": "arrears"}).to_csv(path, index=False)
        elif i == 2:
            path = folder / "train.csv"
            bad = pd.read_csv(path)
            bad.loc[3, "defaulted"] = "maybe"
            bad.to_csv(path, index=False)
        else:
            shutil.rmtree(folder)


def main() -> None:
    """Command line: rewrite the branches' folders."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("sites/bank-own"))
    parser.add_argument("--broken", action="store_true", help="add the refused mistakes")
    args = parser.parse_args()
    if args.root.exists():
        shutil.rmtree(args.root)
    write(args.root, broken=args.broken)
    print(f"wrote {', '.join(SIZES)} under {args.root}")


if __name__ == "__main__":
    main()
