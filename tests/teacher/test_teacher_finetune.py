"""Teacher finetuning: learns next-token prediction, LoRA trains only adapters, exact resume, config checks."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from distill_dag.config import ConfigError, config_from_dict
from distill_dag.teacher.finetune import TrainingInterrupted, finetune_teacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _cfg(**ft):
    teacher = ft.pop("teacher", {"model_name_or_path": None, "init_tiny": TINY})
    base = dict(mode="full", learning_rate=3e-3, batch_size=8, max_steps=10, warmup_steps=2, eval_interval=0,
                eval_batches=4, save_interval=0, log_interval=1, seed=0)
    base.update(ft)
    return config_from_dict({"teacher": teacher, "teacher_ft": base, "tokenize": {"max_seq_length": 64},
                             "train": {"device": "cpu"}, "wandb": {"mode": "disabled"}})


@pytest.fixture(scope="module")
def repeated_corpus(tmp_path_factory, small_corpus):
    """Every document is the same short function: a corpus of one repeated sequence."""
    from distill_dag.data.pack import tokenize_to_parquet
    from distill_dag.data.tokenizer import tokenizer_hash

    root = tmp_path_factory.mktemp("repeated")
    text = "def add(a, b):\n    return a + b\n"
    rows = [json.dumps({"id": f"d{i}", "text": text}) for i in range(400)]
    (root / "raw").mkdir()
    (root / "raw" / "docs.jsonl").write_text("\n".join(rows) + "\n")
    tok = small_corpus["tokenizer"]
    tokenize_to_parquet(root / "raw", root / "tokenized", tok, 64, val_fraction=0.1, rows_per_shard=256,
                        tokenizer_hash=tokenizer_hash(tok))
    return {"tokenized": root / "tokenized", "tokenizer": tok, "text": text}


def test_full_finetune_learns_to_reproduce_a_repeated_sequence(tmp_path, repeated_corpus):
    from transformers import AutoModelForCausalLM

    from distill_dag.data.tokenizer import load_tokenizer

    cfg = _cfg(max_steps=60, learning_rate=1e-2, warmup_steps=5)
    m = finetune_teacher(cfg, repeated_corpus["tokenized"], tmp_path / "ft",
                         tokenizer_dir=repeated_corpus["tokenizer"], log=lambda s: None)
    assert m["val_ppl_after"] < 1.2 < m["val_ppl_before"]
    assert m["meets_expected_improvement"] and m["relative_improvement"] > 0.5
    tok = load_tokenizer(repeated_corpus["tokenizer"])
    model = AutoModelForCausalLM.from_pretrained(m["final_model"]).eval()
    ids = tok(repeated_corpus["text"], add_special_tokens=False)["input_ids"]
    # the first 3 tokens of a document; greedy decoding must continue it exactly
    prompt = torch.tensor([ids[:3]])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=len(ids) - 3,
                         do_sample=False, pad_token_id=tok.eos_token_id)
    assert out[0].tolist() == ids
    # the tokenizer travels with the model and its vocabulary was not extended
    assert load_tokenizer(m["final_model"]).get_vocab() == tok.get_vocab()
    assert model.get_input_embeddings().num_embeddings == len(tok)


def test_lora_trains_only_adapters_and_lowers_val_ppl(tmp_path, small_corpus, tiny_teacher_dir):
    from transformers import AutoModelForCausalLM

    base_before = load_file(tiny_teacher_dir / "model.safetensors")
    cfg = _cfg(mode="lora", lora_r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
               learning_rate=1e-2, max_steps=25, merge=True, teacher={"model_name_or_path": str(tiny_teacher_dir)})
    m = finetune_teacher(cfg, small_corpus["tokenized"], tmp_path / "ft", tokenizer_dir=small_corpus["tokenizer"],
                         log=lambda s: None)
    assert m["val_ppl_after"] < m["val_ppl_before"]
    adapter = load_file(os.path.join(m["final_adapter"], "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())  # B starts at 0: it trained
    assert {k.split(".")[-3] for k in adapter if "lora_A" in k} == {"q_proj", "v_proj", "down_proj"}
    # the base model on disk is untouched, and the merged model = base + adapter differs only in targets
    assert all(torch.equal(v, load_file(tiny_teacher_dir / "model.safetensors")[k]) for k, v in base_before.items())
    merged = load_file(os.path.join(m["merged_model"], "model.safetensors"))
    changed = {k for k, v in merged.items() if not torch.equal(v, base_before[k])}
    assert changed and all(any(t in k for t in ("q_proj", "v_proj", "down_proj")) for k in changed)
    # the merged model scores like base + adapter (reported ppl) on the same val data
    from distill_dag.data.dataset import make_loader
    from distill_dag.loss.perplexity import perplexity

    val = list(make_loader(small_corpus["tokenized"], "val", 8))[:4]
    merged_model = AutoModelForCausalLM.from_pretrained(m["merged_model"])
    assert perplexity(merged_model, val)["ppl"] == pytest.approx(m["val_ppl_after"], rel=1e-4)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_interrupted_run_resumes_to_identical_weights(tmp_path, small_corpus, tiny_teacher_dir, mode):
    extra = dict(mode=mode, max_steps=6, grad_accum=2, eval_interval=2, early_stopping_patience=0, save_interval=0)
    if mode == "lora":  # dropout on: the resumed run must restore the RNG to match
        extra.update(lora_r=4, lora_alpha=8, lora_dropout=0.1, teacher={"model_name_or_path": str(tiny_teacher_dir)})
    cfg = _cfg(**extra)
    kw = dict(tokenizer_dir=small_corpus["tokenizer"])
    full = finetune_teacher(cfg, small_corpus["tokenized"], tmp_path / "a", log=lambda s: None, **kw)

    def kill_at_step_3(msg):
        if msg.startswith("teacher_ft step 3/"):
            os.kill(os.getpid(), signal.SIGTERM)  # the real signal path: handler -> checkpoint -> stop

    with pytest.raises(TrainingInterrupted) as exc:
        finetune_teacher(cfg, small_corpus["tokenized"], tmp_path / "b", log=kill_at_step_3, **kw)
    assert exc.value.step == 3 and exc.value.checkpoint.name == "step-0000003"
    resumed = finetune_teacher(cfg, small_corpus["tokenized"], tmp_path / "b", resume_from=tmp_path / "b",
                               log=lambda s: None, **kw)
    name = "final_adapter/adapter_model.safetensors" if mode == "lora" else "final_model/model.safetensors"
    a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["val_ppl_after"] == full["val_ppl_after"]
    assert resumed["val_ppl_before"] == full["val_ppl_before"]
    assert [h["val_ppl"] for h in resumed["history"]] == [h["val_ppl"] for h in full["history"]]


def test_early_stopping_restores_the_best_weights(tmp_path, small_corpus):
    # a learning rate far too high makes val ppl climb by orders of magnitude from one update to the next
    # (here ~2e5, 1e7, 2e8 at steps 1-3); evaluated every step, so the climb is seen before the schedule's
    # decay lets the model recover (with eval_interval 2 it recovered between evaluations and never stopped)
    cfg = _cfg(max_steps=40, learning_rate=0.5, warmup_steps=0, eval_interval=1, early_stopping_patience=2)
    m = finetune_teacher(cfg, small_corpus["tokenized"], tmp_path / "ft", tokenizer_dir=small_corpus["tokenizer"],
                         log=lambda s: None)
    assert m["early_stopped"] and m["steps"] < 40
    best = min(h["val_ppl"] for h in m["history"])
    assert m["restored_best"] and m["history"][-1]["val_ppl"] > best
    assert m["val_ppl_after"] == pytest.approx(best, rel=1e-6)


def test_config_keys_are_used_or_rejected(tmp_path, small_corpus, tiny_teacher_dir):
    with pytest.raises(ConfigError, match=r"teacher_ft.lora_r"):
        finetune_teacher(_cfg(mode="full", lora_r=8), small_corpus["tokenized"], tmp_path, log=lambda s: None)
    with pytest.raises(ConfigError, match=r"teacher_ft.merge"):
        finetune_teacher(_cfg(mode="full", merge=True), small_corpus["tokenized"], tmp_path, log=lambda s: None)
    bad_target = _cfg(mode="lora", target_modules=["q_proj", "qkv"], teacher={"model_name_or_path": str(tiny_teacher_dir)})
    with pytest.raises(ConfigError, match=r"target_modules: \['qkv'\]"):
        finetune_teacher(bad_target, small_corpus["tokenized"], tmp_path, tokenizer_dir=small_corpus["tokenizer"],
                         log=lambda s: None)
    with pytest.raises(ConfigError, match=r"init_tiny"):
        finetune_teacher(_cfg(teacher={"model_name_or_path": None}), small_corpus["tokenized"], tmp_path,
                         tokenizer_dir=small_corpus["tokenizer"], log=lambda s: None)


def test_cli_finetune_teacher_maps_flags_and_writes_metrics(tmp_path, small_corpus, capsys):
    import yaml

    from distill_dag.cli import main

    root = tmp_path / "data"
    root.mkdir()
    os.symlink(small_corpus["tokenized"], root / "tokenized")
    os.symlink(small_corpus["tokenizer"], root / "tokenizer")
    d = {"data": {"root": str(root)}, "tokenize": {"max_seq_length": 64},
         "teacher": {"model_name_or_path": None, "init_tiny": TINY},
         "teacher_ft": {"mode": "full", "max_steps": 50, "eval_batches": 2, "batch_size": 4,
                        "output_dir": str(tmp_path / "ft")}, "wandb": {"mode": "disabled"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(d))
    assert main(["finetune-teacher", "--config", str(tmp_path / "cfg.yaml"), "--max-steps", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    m = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert m["steps"] == 2 and m["final_model"] == str(tmp_path / "ft" / "final_model")
    assert '"steps": 2' in out and '"meets_expected_improvement"' in out


def test_copy_warmup_resumes_exactly_and_its_evals_are_never_the_best_or_a_stop(tmp_path, small_corpus):
    # steps 1-3 train on copy rows, 4-6 on the corpus (2 rows of each micro-batch pass-key rows); killed inside the
    # warm-up, the resumed run crosses the boundary to the same weights as the uninterrupted one (the corpus loader
    # starts at step 4 in both)
    cfg = _cfg(max_steps=6, copy_warmup_steps=3, copy_rows_per_batch=2, pass_key_rows_per_batch=2, eval_interval=1,
               early_stopping_patience=1, warmup_steps=0)
    kw = dict(tokenizer_dir=small_corpus["tokenizer"])
    full = finetune_teacher(cfg, small_corpus["tokenized"], tmp_path / "a", log=lambda s: None, **kw)
    # patience 1: were a warm-up eval a "best", any worse eval would stop the run inside the warm-up
    assert [h["step"] for h in full["history"]][:4] == [1, 2, 3, 4]
    assert full["best_step"] is not None and full["best_step"] > 3  # copy-row steps are not the corpus's best

    def kill_at_step_2(msg):
        if msg.startswith("teacher_ft step 2/"):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted):
        finetune_teacher(cfg, small_corpus["tokenized"], tmp_path / "b", log=kill_at_step_2, **kw)
    finetune_teacher(cfg, small_corpus["tokenized"], tmp_path / "b", resume_from=tmp_path / "b", log=lambda s: None,
                     **kw)
    a, b = (load_file(tmp_path / d / "final_model/model.safetensors") for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the warm-up changed the training: without it the same seed ends elsewhere
    plain = finetune_teacher(_cfg(max_steps=6, eval_interval=0, warmup_steps=0), small_corpus["tokenized"],
                             tmp_path / "c", log=lambda s: None, **kw)
    c = load_file(os.path.join(plain["final_model"], "model.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_copy_warmup_is_checked_against_the_mode_and_max_steps(tmp_path, small_corpus, tiny_teacher_dir):
    with pytest.raises(ConfigError, match=r"copy_warmup_steps \(6\) must be below teacher_ft.max_steps"):
        finetune_teacher(_cfg(max_steps=6, copy_warmup_steps=6), small_corpus["tokenized"], tmp_path,
                         log=lambda s: None)
    with pytest.raises(ConfigError, match=r"copy_warmup_steps / copy_rows_per_batch / pass_key_rows_per_batch are"):
        finetune_teacher(_cfg(mode="lora", copy_warmup_steps=2, teacher={"model_name_or_path": str(tiny_teacher_dir)}),
                         small_corpus["tokenized"], tmp_path, log=lambda s: None)
    with pytest.raises(ConfigError, match=r"pass_key_rows_per_batch are for a random-init teacher"):
        finetune_teacher(_cfg(mode="lora", pass_key_rows_per_batch=2,
                              teacher={"model_name_or_path": str(tiny_teacher_dir)}),
                         small_corpus["tokenized"], tmp_path, log=lambda s: None)
    with pytest.raises(ConfigError, match=r"pass_key_rows_per_batch \(9\) must be at most teacher_ft.batch_size \(8\)"):
        finetune_teacher(_cfg(pass_key_rows_per_batch=9), small_corpus["tokenized"], tmp_path, log=lambda s: None)


def test_pass_key_rows_longer_than_the_rows_are_refused_before_any_training(tmp_path, small_corpus, monkeypatch):
    import distill_dag.teacher.finetune as tf

    monkeypatch.setattr(tf, "pass_key_row_min_len", lambda encode: 65)  # the corpus packs 64-token rows
    with pytest.raises(ConfigError, match=r"pass_key_rows_per_batch needs rows of at least 65 tokens.*length 64"):
        finetune_teacher(_cfg(pass_key_rows_per_batch=2), small_corpus["tokenized"], tmp_path / "ft",
                         tokenizer_dir=small_corpus["tokenizer"], log=lambda s: None)
    assert not (tmp_path / "ft").exists()  # nothing trained, nothing written


def test_an_update_leaving_the_teacher_non_finite_publishes_no_final_model(tmp_path, small_corpus, monkeypatch):
    """Issue 30 (7) in the teacher finetune, which shares the loop: the last update leaves a weight Inf while its
    loss and gradient were finite (the NaN guard sees nothing); no final_model/ is written."""
    from distill_dag.training import loop as loop_mod
    from distill_dag.training.stability import TrainingFailedError

    real = loop_mod.clip_grad_norm
    calls = {"n": 0}

    def poison_last_update(params, max_norm):
        norm = real(params, max_norm)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                params[0].fill_(float("inf"))
        return norm

    monkeypatch.setattr(loop_mod, "clip_grad_norm", poison_last_update)
    out = tmp_path / "ft"
    with pytest.raises(TrainingFailedError, match=r"teacher finetuning after steps 1..2: 1 weight tensor\(s\) hold NaN "
                                                  r"or Inf \(trained parameter 0 .*teacher_ft.learning_rate"):
        finetune_teacher(_cfg(max_steps=2), small_corpus["tokenized"], out, tokenizer_dir=small_corpus["tokenizer"],
                         log=lambda s: None)
    assert not (out / "final_model").exists() and not (out / "metrics.json").exists()


def test_a_random_init_teacher_in_lora_mode_is_refused_before_training(tmp_path, small_corpus):
    """Its adapter would sit on a base that is never saved (the cache and the students could not load it)."""
    with pytest.raises(ConfigError, match=r"teacher\.model_name_or_path is null.*teacher_ft\.mode is lora"):
        finetune_teacher(_cfg(mode="lora"), small_corpus["tokenized"], tmp_path / "ft",
                         tokenizer_dir=small_corpus["tokenizer"], log=lambda s: None)
    assert not (tmp_path / "ft" / "final_adapter").exists()
