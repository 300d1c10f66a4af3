import pytest

from distill_dag.config import CONFIG_DIR, ConfigError, config_from_dict, load_config


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
def test_every_shipped_config_loads(name):
    load_config(name)


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rat'"):
        config_from_dict({"train": {"learning_rat": 0.1}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"key 'tokenize.max_seq_length'"):
        config_from_dict({"tokenize": {"max_seq_length": "long"}})


def test_base_inheritance_and_overrides():
    cfg = load_config("train_cached.yaml", {"train": {"max_steps": 7}})
    assert cfg.train.teacher_mode == "cached"
    assert cfg.student.variant == "500M"  # inherited from train_direct.yaml
    assert cfg.train.max_steps == 7


def test_bad_yaml_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(p)
