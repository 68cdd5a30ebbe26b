from pathlib import Path

import pytest

from fl_components.config import FederationConfig, flatten_config, load_config
from fl_components.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fed.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_is_valid(example: Path) -> None:
    assert load_config(example).rounds >= 1


def test_defaults_are_the_demo() -> None:
    config = FederationConfig()

    assert len(config.sites) == 10 and config.rounds == 20
    assert config.data.dataset == "digits" and config.data.partitioner == "dirichlet"
    assert config.data.alpha == 0.5 and config.strategy.name == "fedavg"


def test_bad_literal_names_field_and_allowed_values(tmp_path: Path) -> None:
    path = write(tmp_path, "strategy: {name: fedsgdx}\n")

    with pytest.raises(ConfigError) as error:
        load_config(path)

    message = str(error.value)
    assert "strategy.name" in message and "'fedavg'" in message and "fedsgdx" in message


def test_out_of_range_names_field_and_bound(tmp_path: Path) -> None:
    path = write(tmp_path, "rounds: 0\ntraining: {lr: -1}\n")

    with pytest.raises(ConfigError) as error:
        load_config(path)

    message = str(error.value)
    assert "rounds" in message and "greater than or equal to 1" in message
    assert "training.lr" in message and "-1" in message


def test_unknown_key_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"training\.epoch: is not a known setting"):
        load_config(write(tmp_path, "training: {epoch: 3}\n"))


def test_duplicate_site_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="repeated: a"):
        load_config(write(tmp_path, "sites: [{name: a}, {name: a}]\n"))


def test_min_participants_above_sites(tmp_path: Path) -> None:
    text = "sites: [{name: a}, {name: b}]\nparticipation: {min_participants: 3}\n"

    with pytest.raises(ConfigError, match="exceeds the number of sites"):
        load_config(write(tmp_path, text))


def test_site_files_need_paths_and_shapes(tmp_path: Path) -> None:
    text = "sites: [{name: a}, {name: b}]\ndata: {source: site_files}\n"

    with pytest.raises(ConfigError, match="have no data_path: a, b"):
        load_config(write(tmp_path, text))


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "rounds: [1,\n"))


def test_flat_params_cover_every_section() -> None:
    flat = flatten_config(FederationConfig())

    assert flat["training.epochs"] == "5"
    assert flat["sites.count"] == "10" and flat["sites.3.name"] == "site-03"
    assert flat["data.alpha"] == "0.5"


def test_help_text_placeholders_survive_the_prefect_form_markdown() -> None:
    """The UI renders descriptions as markdown: a bare `<ext>` would vanish as an HTML tag."""
    import re

    def descriptions(node: object) -> list[str]:
        if isinstance(node, dict):
            found = [node["description"]] if isinstance(node.get("description"), str) else []
            return found + [d for value in node.values() for d in descriptions(value)]
        if isinstance(node, list):
            return [d for value in node for d in descriptions(value)]
        return []

    texts = descriptions(FederationConfig.model_json_schema())
    bare = [t for t in texts if re.search(r"<[a-z_]+>", re.sub(r"`[^`]*`", "", t))]

    assert any("`train.<ext>`" in t for t in texts)
    assert bare == []
