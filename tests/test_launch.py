"""Launch setups Gazal cannot run correctly are refused before anything runs."""

from pathlib import Path

import pytest

from gazal import recipes
from gazal.cli import main
from gazal.errors import GazalError

SHIPPED = Path(recipes.__file__).parent / "accelerate"


def test_fsdp1_under_accelerate_launch_is_refused_at_validate(monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.delenv("FSDP_VERSION", raising=False)  # accelerate's default when a config omits it: 1
    assert main(["validate", "--config", "demo"]) == 2
    assert "FSDP_VERSION=1" in capsys.readouterr().err
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert main(["validate", "--config", "demo"]) == 0


def test_an_fsdp1_accelerate_config_is_refused_naming_its_line(tmp_path, capsys):
    text = (SHIPPED / "fsdp.yaml").read_text().replace("fsdp_version: 2", "fsdp_version: 1")
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "fsdp_version" in t)
    bad = tmp_path / "fsdp1.yaml"
    bad.write_text(text)
    assert main(["validate", "--config", "demo", "--accelerate-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:{line}: fsdp_config.fsdp_version" in err and "FSDP2" in err
    # No fsdp_version at all is FSDP1 to accelerate.
    bad.write_text(text.replace("  fsdp_version: 1\n", ""))
    with pytest.raises(GazalError, match="fsdp_version 1"):
        recipes.check_accelerate_config(bad)


@pytest.mark.parametrize("name", sorted(p.name for p in SHIPPED.glob("*.yaml")))
def test_every_shipped_accelerate_config_is_accepted(name, capsys):
    assert main(["validate", "--config", "demo", "--accelerate-config", str(SHIPPED / name)]) == 0


def test_an_fsdp_config_without_full_state_dict_is_refused(tmp_path):
    text = (SHIPPED / "fsdp.yaml").read_text().replace("FULL_STATE_DICT", "SHARDED_STATE_DICT")
    bad = tmp_path / "sharded.yaml"
    bad.write_text(text)
    with pytest.raises(GazalError, match="fsdp_config.fsdp_state_dict_type: SHARDED_STATE_DICT"):
        recipes.check_accelerate_config(bad)


def test_a_missing_accelerate_config_is_a_clear_error(tmp_path, capsys):
    assert main(["validate", "--config", "demo", "--accelerate-config", str(tmp_path / "none.yaml")]) == 2
    assert "--accelerate-config: file not found" in capsys.readouterr().err
