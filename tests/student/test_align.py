"""Stage 1 (retention alignment): per-layer MSE falls, only retention moves, exact resume, reuse and
refusal by lineage, and KD (stage 2) starting from the aligned student."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from support import cfg_dict

from distill_dag.config import config_from_dict
from distill_dag.student.align import align_student, aligned_dir, load_aligned_student, teacher_attention_io
from distill_dag.student.run import run_student
from distill_dag.student.trainer import train


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(tmp_path, corpus, teacher_dir, align=None, **train_kw):
    """Stage 1 + KD from the teacher: the tiny train config of support.cfg_dict with a from_teacher student."""
    a = dict(steps=40, learning_rate=1e-2, warmup_steps=2, batch_size=8, log_interval=5, eval_interval=20,
             eval_batches=2, save_interval=20, seed=0)
    t = dict(temperature=1.0, max_steps=0, grad_accum=1, save_interval=0, keep_checkpoints=2, learning_rate=1e-3,
             warmup_steps=100)  # the library defaults these tests were written with
    d = cfg_dict(tmp_path, corpus, teacher_dir, **{**t, **train_kw})
    d["teacher_ft"]["output_dir"] = str(tmp_path / "no_teacher_ft")
    d["student"] = {"init": "from_teacher", "chunk_size": 16}
    d["align"] = {**a, **(align or {})}
    return config_from_dict(d)


@pytest.fixture(scope="module")
def aligned(tmp_path_factory, small_corpus, tiny_teacher_dir):
    tmp = tmp_path_factory.mktemp("align")
    cfg = _cfg(tmp, small_corpus, tiny_teacher_dir)
    return cfg, align_student(cfg)


def test_alignment_lowers_the_held_out_mse_of_every_layer(aligned):
    _, res = aligned
    assert res.steps == 40 and len(res.mse_before) == len(res.mse_after) == 2
    for before, after, rel in zip(res.mse_before, res.mse_after, res.rel_mse_after):
        assert after < 0.5 * before, (before, after)
        assert rel < 1.0  # better than predicting zero


def test_reported_mse_matches_an_independent_recomputation(aligned, small_corpus, tiny_teacher_dir):
    """Layer 0's held-out MSE recomputed without the hooks: x = input_layernorm(embedding), y = the teacher's
    attention recomputed by SoftmaxAttention on the unaligned conversion (proven equal to the teacher's in
    tests/model/test_convert.py), r = the aligned student's retention."""
    from distill_dag.data.dataset import make_loader
    from distill_dag.teacher.model import load_teacher
    from distill_dag.model.convert import SoftmaxAttention, convert_teacher
    from distill_dag.model.retnet import RetNetForCausalLM

    cfg, res = aligned
    teacher = load_teacher(cfg.teacher, torch.device("cpu"), model_path=tiny_teacher_dir)
    attention = SoftmaxAttention(convert_teacher(teacher)[0].model.layers[0].retention)
    student = RetNetForCausalLM.from_pretrained(res.final_dir).eval()
    batches = [b for _, b in zip(range(2), make_loader(small_corpus["tokenized"], "val", 8, shuffle=False,
                                                      infinite=False))]
    se, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            pos, am = b["position_ids"], b["attention_mask"]
            x = teacher.model.layers[0].input_layernorm(teacher.model.embed_tokens(b["input_ids"]))
            y = attention(x, pos, None, None, None)
            hx, hy = teacher_attention_io(teacher, b)
            torch.testing.assert_close(hx[0], x)
            torch.testing.assert_close(hy[0], y, rtol=1e-4, atol=1e-6)
            r = student.model.layers[0].retention(x, pos, pos == 0, None if am.all() else am, None)
            m = am.bool()
            se += float(((r - y)[m] ** 2).sum())
            n += int(m.sum()) * x.shape[-1]
    assert se / n == pytest.approx(res.mse_after[0], rel=1e-3)


def test_only_retention_parameters_change_during_alignment(aligned, tiny_teacher_dir):
    from distill_dag.teacher.model import load_teacher

    cfg, res = aligned
    teacher = load_teacher(cfg.teacher, torch.device("cpu"), model_path=tiny_teacher_dir)
    t = teacher.state_dict()
    s = load_file(str(res.final_dir / "model.safetensors"))
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    for i in range(2):
        assert torch.equal(s[f"model.layers.{i}.ffn.down_proj.weight"], t[f"model.layers.{i}.mlp.down_proj.weight"])
        assert torch.equal(s[f"model.layers.{i}.retention_norm.weight"], t[f"model.layers.{i}.input_layernorm.weight"])
        assert torch.equal(s[f"model.layers.{i}.ffn_norm.weight"], t[f"model.layers.{i}.post_attention_layernorm.weight"])
        # the copied Q was trained away from the teacher's
        assert not torch.equal(s[f"model.layers.{i}.retention.q_proj.weight"], t[f"model.layers.{i}.self_attn.q_proj.weight"])
    assert torch.equal(s["model.norm.weight"], t["model.norm.weight"])


def test_alignment_stopped_by_sigint_checkpoints_and_resumes_to_the_same_weights(tmp_path, small_corpus, tiny_teacher_dir):
    small = dict(steps=6, save_interval=3, eval_interval=0, log_interval=1)
    full = align_student(_cfg(tmp_path / "a", small_corpus, tiny_teacher_dir, small))
    cfg_b = _cfg(tmp_path / "b", small_corpus, tiny_teacher_dir, small)

    def interrupt_at_step_4(msg):
        if msg.startswith("[train 4]"):
            os.kill(os.getpid(), signal.SIGINT)  # the real path: handler -> finish the step -> checkpoint

    with pytest.raises(KeyboardInterrupt, match="stopped at step 4"):
        align_student(cfg_b, echo=interrupt_at_step_4)
    assert (aligned_dir(cfg_b) / "checkpoints" / "step-0000004").is_dir()
    resumed = align_student(cfg_b)
    wa = load_file(str(full.final_dir / "model.safetensors"))
    wb = load_file(str(resumed.final_dir / "model.safetensors"))
    assert resumed.steps == 6 and resumed.tokens == full.tokens and wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert resumed.mse_before == full.mse_before
    log = (aligned_dir(cfg_b) / "metrics.jsonl").read_text()
    assert '"event": "resumed"' in log


def test_finished_alignment_is_reused_and_a_changed_config_is_refused(aligned, small_corpus):
    cfg, res = aligned
    again = align_student(cfg)
    assert again.reused and again.mse_after == res.mse_after
    changed = cfg.model_copy(deep=True)
    changed.align.learning_rate = 5e-3
    with pytest.raises(RuntimeError, match="align"):
        load_aligned_student(changed)
    with pytest.raises(RuntimeError, match="align"):
        align_student(changed)


def test_kd_with_from_teacher_needs_stage_one(tmp_path, small_corpus, tiny_teacher_dir):
    with pytest.raises(FileNotFoundError, match="stage 1"):
        train(_cfg(tmp_path, small_corpus, tiny_teacher_dir))


def test_run_student_aligns_then_kd_starts_from_the_aligned_student(tmp_path, small_corpus, tiny_teacher_dir):
    cfg = _cfg(tmp_path, small_corpus, tiny_teacher_dir, {"steps": 3, "eval_interval": 0, "save_interval": 0,
                                            "output_dir": str(tmp_path / "aligned")})
    cfg.data.root = str(small_corpus["root"])  # cfg.tokenized_dir = <root>/tokenized
    out = run_student(cfg)
    aligned = json.loads((aligned_dir(cfg) / "final" / "align.json").read_text())
    assert aligned["steps"] == 3 and out["student"].steps == 0
    assert out["alignment"].mse_after == aligned["mse_after"]
    conv = out["alignment"].conversion  # what the student_aligned asset reports beside the MSE
    assert conv["mapping"] and conv["new_params"]
    wa = load_file(str(aligned_dir(cfg) / "final" / "model.safetensors"))
    wk = load_file(str(out["student"].final_dir / "model.safetensors"))
    assert wa.keys() == wk.keys() and all(torch.equal(wa[k], wk[k]) for k in wa)
    said: list[str] = []
    kd = run_student(cfg.model_copy(update={"train": cfg.train.model_copy(update={
        "max_steps": 2, "output_dir": str(tmp_path / "kd2")})}, deep=True), echo=said.append)
    assert any("stage 1 skipped" in s for s in said) and kd["student"].steps == 2
    assert all(h["kl"] > 0 for h in kd["student"].history if h["kind"] == "train")
