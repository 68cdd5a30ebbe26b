"""Write simulated site folders for an example task's config.

``python -m fedpipe_examples.make_sites examples/tasks/images.yaml`` writes each site's
files into its ``data_path`` with the task module's ``make_site`` (a real site has its own
files there already).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from fl_components.config import load_config


def main(config_path: str) -> None:
    """Write every site of the config at ``config_path`` (existing files are overwritten)."""
    config = load_config(Path(config_path))
    if config.task is None:
        raise SystemExit(f"{config_path}: no task to make sites for")
    module = importlib.import_module(config.task.partition(":")[0])
    for index, site in enumerate(config.sites):
        folder = Path(site.data_path or Path(config.data.sites_dir) / config.name / site.name)
        module.make_site(folder, seed=config.seed * 1000 + index)
        print(folder)


if __name__ == "__main__":
    main(sys.argv[1])
