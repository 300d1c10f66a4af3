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


# ---- every field documented and bounded (issue 14 item 6, issue 16) ---------------------------------
import time  # noqa: E402
import typing  # noqa: E402

from distill_dag.config import PipelineConfig, Section, SourceConfig  # noqa: E402


def _fields(model, prefix=""):
    for name, f in model.model_fields.items():
        yield prefix + name, f
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, Section):
            yield from _fields(ann, prefix + name + ".")
    if model is PipelineConfig:
        yield from _fields(SourceConfig, "data.sources[].")


def test_every_field_has_a_description_and_every_number_a_bound():
    undocumented = [k for k, f in _fields(PipelineConfig) if not f.description]
    assert not undocumented, undocumented
    unbounded = []
    for k, f in _fields(PipelineConfig):
        ann = f.annotation
        args = set(typing.get_args(ann)) | {ann}
        if (int in args or float in args) and not any(hasattr(m, a) for m in f.metadata for a in ("ge", "gt", "le", "lt")):
            unbounded.append(k)
    assert not unbounded, unbounded


@pytest.mark.parametrize("key,value", [
    ("train.grad_accum", 0), ("train.max_steps", -5), ("train.batch_size", 0), ("train.learning_rate", -1e-3),
    ("train.learning_rate", float("nan")), ("train.muon_learning_rate", float("inf")), ("teacher_ft.grad_accum", 0),
    ("tokenize.max_seq_length", 0), ("tokenize.max_seq_length", -5), ("tokenize.rows_per_shard", -1),
    ("tokenize.val_fraction", 1.5), ("train.temperature", float("nan")), ("train.teacher_mode", "bogus"),
    ("student.variant", "7B"),
])
def test_bad_values_are_refused_naming_the_key(key, value):
    sec, leaf = key.split(".")
    with pytest.raises(ConfigError, match=rf"key '{key}'"):
        config_from_dict({sec: {leaf: value}})


def test_max_steps_zero_is_only_for_stage_one_alone():
    with pytest.raises(ConfigError, match=r"key 'train.max_steps': 0 trains nothing"):
        config_from_dict({"train": {"max_steps": 0}})
    assert config_from_dict({"train": {"max_steps": 0}, "student": {"init": "from_teacher"}}).train.max_steps == 0


def test_teacher_topk_above_a_known_vocabulary_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"key 'train.teacher_topk': 5000 is above the vocabulary \(4096"):
        config_from_dict({"train": {"teacher_topk": 5000}})
    # a hub tokenizer: unknown here, checked where it is known (e.g. the manifest)
    cfg = config_from_dict({"tokenizer": {"name_or_path": "some/hub-id"}, "train": {"teacher_topk": 5000}})
    from distill_dag.config import check_vocab

    with pytest.raises(ConfigError, match=r"key 'train.teacher_topk'.*above the vocabulary \(96, manifest"):
        check_vocab(cfg, 96, "manifest x")


def test_a_bad_value_in_a_file_names_the_file_and_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  grad_accum: 0\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*\n.*key 'train.grad_accum'"):
        load_config(p)


# ---- base: chains, duplicate keys ---------------------------------------------------------------------
def _refused_fast(path, match):
    t = time.perf_counter()
    with pytest.raises(ConfigError, match=match):
        load_config(path)
    assert time.perf_counter() - t < 2.0


def test_base_cycle_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    _refused_fast(tmp_path / "a.yaml", r"base: cycle .*a\.yaml -> .*b\.yaml -> .*a\.yaml")


def test_base_self_cycle_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: a.yaml\n")
    _refused_fast(tmp_path / "a.yaml", "base: cycle")


def test_base_as_a_list_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: [demo.yaml, train_direct.yaml]\n")
    _refused_fast(tmp_path / "a.yaml", r"a\.yaml: key 'base' must be one file name")


def test_base_binary_file_is_refused(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "a.yaml").write_text("base: bin.yaml\n")
    _refused_fast(tmp_path / "a.yaml", r"bin\.yaml: a binary file")


def test_base_directory_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "a.yaml").write_text("base: d\n")
    _refused_fast(tmp_path / "a.yaml", r"d: is a directory")


def test_base_missing_names_the_file_and_key(tmp_path):
    (tmp_path / "a.yaml").write_text("base: nope.yaml\n")
    _refused_fast(tmp_path / "a.yaml", r"a\.yaml: key 'base': config file not found: nope\.yaml")


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


@pytest.mark.timeout(20)
def test_alias_bomb_through_base_is_refused_at_once(tmp_path):
    (tmp_path / "bomb.yaml").write_text(BOMB)
    (tmp_path / "a.yaml").write_text("base: bomb.yaml\n")
    _refused_fast(tmp_path / "a.yaml", r"bomb\.yaml: YAML aliases expand to more than")
    _refused_fast(tmp_path / "bomb.yaml", "alias bomb")


def test_small_anchors_still_work(tmp_path):
    (tmp_path / "a.yaml").write_text("train: &t\n  max_steps: 7\nteacher_ft:\n  max_steps: 9\n")
    assert load_config(tmp_path / "a.yaml").train.max_steps == 7


def test_duplicate_keys_are_refused_with_file_and_line(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("train:\n  max_steps: 5\n  batch_size: 2\n  max_steps: 9\n")
    _refused_fast(p, r"dup\.yaml: duplicate key 'max_steps' at line 4 \(first at line 2\)")
    p.write_text("train: {}\neval: {}\ntrain: {}\n")
    _refused_fast(p, r"dup\.yaml: duplicate key 'train' at line 3")


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("train:\n  <<: {max_steps: 5, batch_size: 2}\n  max_steps: 9\n")
    cfg = load_config(p)
    assert (cfg.train.max_steps, cfg.train.batch_size) == (9, 2)


# ---- seed keys get a hint -----------------------------------------------------------------------------
def test_a_seed_key_gets_did_you_mean():
    with pytest.raises(ConfigError, match=r"unknown key 'model_variant' \(a seed config key: did you mean "
                                          r"`student.variant`\?.*migrate-config"):
        config_from_dict({"model_variant": "500M"})
    with pytest.raises(ConfigError, match=r"unknown key 'num_workers' \(a seed config key with no equivalent"):
        config_from_dict({"num_workers": 4})


def test_a_key_in_the_wrong_section_gets_did_you_mean():
    with pytest.raises(ConfigError, match=r"unknown key 'train.vocab_size' \(did you mean `tokenizer.vocab_size`"):
        config_from_dict({"train": {"vocab_size": 10}})


def test_removed_key_nothing_read_is_unknown():
    with pytest.raises(ConfigError, match=r"unknown key 'tokenize.num_proc'"):
        config_from_dict({"tokenize": {"num_proc": 2}})


# ---- paths (issue 17) ---------------------------------------------------------------------------------
def test_paths_in_a_config_file_resolve_against_its_folder(tmp_path, monkeypatch):
    d = tmp_path / "proj" / "cfgs"
    d.mkdir(parents=True)
    (d / "c.yaml").write_text("data:\n  root: ../data\n  sources: [{name: j, kind: jsonl, path: raw/*.jsonl}]\n"
                              "train:\n  output_dir: runs/x\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("proj/cfgs/c.yaml")
    assert cfg.data_root == tmp_path / "proj" / "data"
    assert cfg.run_dir == d / "runs" / "x"
    assert cfg.data.sources[0].path == str(d / "raw" / "*.jsonl")


def test_paths_of_a_base_file_resolve_against_that_file(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "base.yaml").write_text("train:\n  output_dir: out\n")
    (tmp_path / "top.yaml").write_text("base: b/base.yaml\nlogit_cache:\n  dir: cache\n")
    cfg = load_config(tmp_path / "top.yaml")
    assert cfg.run_dir == tmp_path / "b" / "out" and cfg.cache_dir == tmp_path / "cache"


def test_bundled_configs_are_found_by_name_and_their_paths_are_relative_to_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("demo.yaml")
    assert cfg.data_root == tmp_path / "data" / "demo" and cfg.run_dir == tmp_path / "runs" / "demo" / "student"
    (tmp_path / "mine.yaml").write_text("base: train_direct.yaml\n")  # a bundled base by name
    assert load_config("mine.yaml").train.teacher_mode == "direct"


def test_overrides_resolve_against_cwd_and_hub_ids_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tok").mkdir()
    cfg = load_config("demo.yaml", {"train": {"output_dir": "rel_out"}, "tokenizer": {"name_or_path": "tok"},
                                    "teacher": {"model_name_or_path": "meta-llama/Llama-3.2-1B"}})
    assert cfg.run_dir == tmp_path / "rel_out"
    assert cfg.tokenizer.name_or_path == str(tmp_path / "tok")
    assert cfg.teacher.model_name_or_path == "meta-llama/Llama-3.2-1B"


def test_config_not_found_lists_the_bundled_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"config file not found: nope\.yaml .*demo\.yaml"):
        load_config("nope.yaml")


def test_every_number_and_list_has_an_upper_bound():
    """Issue 30: a size taken from a config is bounded before anything is allocated from it, so every
    numeric field has le/lt and every list a max_length (train.betas: a 2-tuple of bounded floats)."""
    unbounded = []
    for k, f in _fields(PipelineConfig):
        ann = f.annotation
        args = set(typing.get_args(ann)) | {ann}
        if k == "train.betas" or not (int in args or float in args or typing.get_origin(ann) is list):
            continue
        if k == "data.sources":  # a list of sections: each bounded by SourceConfig's own fields
            assert f.metadata and any(getattr(m, "max_length", None) for m in f.metadata)
            continue
        if not any(getattr(m, a, None) is not None for m in f.metadata for a in ("le", "lt", "max_length")):
            unbounded.append(k)
    assert not unbounded, unbounded
