"""Hybrid students train everywhere pure ones do: cached teacher mode with a bitwise resume, DDP over gloo,
and the from_teacher stage with the KL-guided layer choice feeding KD."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from _rel import TRAIN_CHILD, cfg_dict, final_weights, run_child, write_cfg
from distill_dag.config import config_from_dict
from distill_dag.teacher.cache_stage import build_logit_cache
from distill_dag.student.trainer import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HYBRID = {"num_hidden_layers": 2}


def _hybrid_dict(tmp_path, corpus, teacher, **train_kw):
    d = cfg_dict(tmp_path, corpus, teacher, **train_kw)
    d["student"]["overrides"].update(HYBRID)
    d["student"]["attention_layers"] = [1]
    return d


def test_a_hybrid_trains_from_the_cache_and_resumes_bitwise(tmp_path, small_corpus, tiny_teacher_dir):
    kw = dict(teacher_mode="cached", max_steps=6, save_interval=3, keep_checkpoints=5, optimizer="adamw",
              autocast="off")
    cfg = config_from_dict(_hybrid_dict(tmp_path, small_corpus, tiny_teacher_dir, **kw))
    build_logit_cache(cfg, model_path=tiny_teacher_dir)
    full = train(cfg)
    saved = json.loads((full.final_dir / "config.json").read_text())
    assert saved["layer_types"] == ["linear_attention", "full_attention"]
    assert all(h["kl"] > 0 for h in full.history if h["kind"] == "train")  # the cache's teacher was used

    cut = config_from_dict(_hybrid_dict(tmp_path, small_corpus, tiny_teacher_dir,
                                        **{**kw, "output_dir": str(tmp_path / "cut")}))
    with pytest.raises(KeyboardInterrupt):
        train(cut, stop_after=3)
    resumed = train(cut.model_copy(update={"train": cut.train.model_copy(update={"resume_from": str(tmp_path / "cut")})},
                                   deep=True))
    assert resumed.steps == full.steps == 6
    wa, wb = final_weights(full.run_dir), final_weights(resumed.run_dir)
    assert wa.keys() == wb.keys() and any(".attention." in k for k in wa)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_two_ddp_processes_train_a_hybrid_like_one_process(tmp_path, small_corpus, tiny_teacher_dir):
    base = dict(max_steps=4, batch_size=4, save_interval=2, keep_checkpoints=5, warmup_steps=1, eval_batches=1,
                optimizer="adamw", autocast="off", dist_timeout_s=120)

    def run(name, nproc, **kw):
        d = _hybrid_dict(tmp_path, small_corpus, tiny_teacher_dir, **{**base, "output_dir": str(tmp_path / name), **kw})
        cfg = write_cfg(tmp_path / f"{name}.yaml", d)
        launcher = TRAIN_CHILD if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1",
            "--nproc-per-node", str(nproc), "-m", "distill_dag.train"]
        r = run_child([*launcher, "--config", str(cfg)], timeout=120)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    run("single", 1, batch_size=4)
    run("ddp", 2, batch_size=2)
    ws, wd = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    assert any(".attention." in k for k in ws)
    for k in ws:  # as tests/reliability/test_distributed.py: summation order differs across ranks
        torch.testing.assert_close(wd[k], ws[k], rtol=1e-3, atol=3e-4)


def test_hybrid_stage_chooses_layers_by_kl_and_kd_starts_from_that_hybrid(tmp_path, small_corpus, tiny_teacher_dir):
    from distill_dag.student.run import run_hybrid_student

    # stage 1 reads 3 x 4 rows = 2 KD steps of 4 x 2 rows: the hybrid trains 4 - 2 KD steps (equal rows in all)
    d = cfg_dict(tmp_path, small_corpus, tiny_teacher_dir, max_steps=4, save_interval=0, autocast="off")
    d["teacher_ft"]["output_dir"] = str(tmp_path / "no_teacher_ft")
    d["align"] = dict(steps=3, eval_interval=0, save_interval=0, batch_size=4, eval_batches=1)
    d["hybrid"] = {"enabled": True, "attention_layers": "auto", "num_attention_layers": 1}
    cfg = config_from_dict(d)
    out = run_hybrid_student(cfg)
    al, st = out["alignment"], out["student"]
    teacher_layers = json.loads((tiny_teacher_dir / "config.json").read_text())["num_hidden_layers"]
    assert [r["layer"] for r in al.layer_gains] == list(range(teacher_layers))
    best = max(al.layer_gains, key=lambda r: (r["gain"], -r["layer"]))["layer"]
    assert al.attention_layers == [best]
    types = json.loads((st.final_dir / "config.json").read_text())["layer_types"]
    assert [i for i, t in enumerate(types) if t == "full_attention"] == [best]
    assert st.steps == 2 and str(st.final_dir).endswith("_hybrid/final")
    card = json.loads((st.final_dir / "model_card.json").read_text())
    assert card["hybrid"]["attention_layers"] == [best]
    assert "restored to attention" in (st.final_dir / "README.md").read_text()


FRESH = r'''
import importlib.abc, json, sys


class NoDistillDag(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "distill_dag" or name.startswith("distill_dag."):
            raise ImportError(f"the shipped checkpoint code imported {name}")


sys.meta_path.insert(0, NoDistillDag())
import torch
from transformers import AutoModelForCausalLM

folder, ids_file, out_file = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
ids = torch.load(ids_file)
with torch.no_grad():
    torch.save({"logits": model(input_ids=ids).logits,
                "gen": model.generate(ids[:1, :8], max_new_tokens=12, min_new_tokens=12, do_sample=False)}, out_file)
print(json.dumps({"class": type(model).__module__, "layer_types": model.config.layer_types}))
'''


def test_a_hybrid_checkpoint_loads_through_trust_remote_code_alone(tmp_path, small_corpus, tiny_teacher_dir):
    import os
    import subprocess

    from transformers import AutoModelForCausalLM

    cfg = config_from_dict(_hybrid_dict(tmp_path, small_corpus, tiny_teacher_dir, max_steps=2, save_interval=0,
                                        autocast="off"))
    final = train(cfg).final_dir
    ours = AutoModelForCausalLM.from_pretrained(str(final)).eval()  # in-package: distill_dag's classes
    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, gen = ours(input_ids=ids).logits, ours.generate(ids[:1, :8], max_new_tokens=12, min_new_tokens=12,
                                                             do_sample=False)
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "fresh.py").write_text(FRESH)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-I", str(tmp_path / "fresh.py"), str(final), str(tmp_path / "ids.pt"),
                           str(tmp_path / "out.pt")], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["class"].startswith("transformers_modules.")
    assert info["layer_types"] == ["linear_attention", "full_attention"]
    got = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(got["logits"], ref, rtol=0, atol=1e-6)
    assert torch.equal(got["gen"], gen)
