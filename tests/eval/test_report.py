"""evaluate_checkpoint / `distill eval`: one report for a RetNet student, the teacher and a CE-only baseline."""

import json

import pytest
import torch
import yaml

from distill_dag.config import config_from_dict
from distill_dag.eval.report import evaluate_checkpoint
from support import TINY_LLAMA, tiny_llama


def _cfg_dict(root):
    return {
        "data": {"root": str(root)},
        "tokenize": {"max_seq_length": 64},
        "teacher": {"model_name_or_path": None, "init_tiny": TINY_LLAMA},
        "teacher_ft": {"mode": "full", "output_dir": str(root / "teacher_ft")},
        "train": {"device": "cpu", "output_dir": str(root / "run")},
        "eval": {"max_batches": 2, "batch_size": 4, "niah_context_lengths": [64, 96], "niah_depths": [0.5],
                 "niah_trials": 2, "sample_prompts": 2, "sample_prompt_tokens": 8, "max_new_tokens": 6},
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory, small_corpus):
    """A data root (the shared small corpus), a RetNet student run, a finetuned-teacher folder, a baseline."""
    import os

    from distill_dag.data.manifest import Manifest
    from distill_dag.model.variants import student_config
    from distill_dag.model.retnet import RetNetForCausalLM

    root = tmp_path_factory.mktemp("evalrun")
    os.symlink(small_corpus["tokenized"], root / "tokenized")
    os.symlink(small_corpus["tokenizer"], root / "tokenizer")
    vocab = Manifest.load(small_corpus["tokenized"]).vocab_size
    torch.manual_seed(0)
    student = RetNetForCausalLM(student_config("tiny", vocab, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=64))
    student.save_pretrained(root / "run" / "final")
    (root / "run" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "kind": "train", "loss": 6.0 - s / 10, "ce": 6.1 - s / 10}) + "\n" for s in range(1, 6)
    ) + json.dumps({"step": 5, "kind": "eval", "val_loss": 5.8}) + "\n")
    tiny_llama(vocab, seed=7).save_pretrained(root / "teacher_ft" / "final_model")
    tiny_llama(vocab, seed=8).save_pretrained(root / "baseline")
    return root


def test_report_has_every_model_niah_samples_and_plots(tmp_path, run):
    from distill_dag.data.dataset import make_loader
    from distill_dag.loss.perplexity import perplexity

    cfg = config_from_dict(_cfg_dict(run))
    r = evaluate_checkpoint(run / "run" / "final", cfg, run / "tokenized", tmp_path / "eval",
                            teacher=run / "teacher_ft", baseline=run / "baseline", log=lambda s: None)
    names = [row["model"] for row in r["perplexity_rows"]]
    assert names == ["student", "CE-only baseline", "teacher (base)", "teacher (adapted)"]
    # the student's row is the plain perplexity of that checkpoint on the same batches
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(run / "run" / "final")
    batches = list(make_loader(run / "tokenized", "val", 4))[:2]
    assert r["student_ppl"] == pytest.approx(perplexity(student, batches)["ppl"], rel=1e-5)
    # teacher (base) is the seed-0 tiny init rebuilt, != the finetuned (here: seed-7) weights
    assert r["perplexity_rows"][2]["ppl"] != r["perplexity_rows"][3]["ppl"]
    # NIAH ran through generate on the RetNet (random init: it cannot find the key)
    niah = json.loads((tmp_path / "eval" / "niah.json").read_text())
    assert len(niah["student"]["results"]) == 2 * 1 * 2 and r["niah_accuracy"] == 0.0
    assert all(x["generated"] for x in niah["student"]["results"])
    assert {"student", "CE-only baseline", "teacher (adapted)"} <= set(niah)
    # one side-by-side heat-map: every compared model, and each student's per-cell ratio to the teacher
    assert set(r["niah_models"]) == {"student", "CE-only baseline", "teacher (adapted)"}
    assert set(r["niah_ratio_grids"]) == {"student", "CE-only baseline"}
    assert r["niah_models"]["student"]["accuracy_at_train_len"] == 0.0  # 64 = tokenize.max_seq_length
    assert r["niah_models"]["student"]["accuracy_beyond_train_len"] == 0.0  # 96 > 64
    # the gate's numbers (eval_report's checks) are the training length's cells
    assert r["niah_accuracy_at_train_len"] == r["niah_models"]["student"]["accuracy_at_train_len"]
    assert r["niah_teacher_accuracy_at_train_len"] == r["niah_models"]["teacher (adapted)"]["accuracy_at_train_len"]
    # long context: 1x..8x the training length for the students and the teacher, cache and ms/token
    lc = r["long_context_ppl"]
    assert lc["lengths"] == [64, 128, 256, 512] and set(lc["by_length"]) == set(r["niah_models"])
    cost = r["generation_cost"]
    assert len({row["cache_bytes"] for row in cost["student"]}) == 1  # the recurrent state is flat
    kv = [row["cache_bytes"] for row in cost["teacher (adapted)"]]
    assert kv == sorted(kv) and kv[-1] >= 7 * kv[0]  # the KV cache grows with the context
    for key in ("niah_png", "long_context_png", "loss_png", "report_path"):
        assert (tmp_path / "eval" / r[key].split("/")[-1]).stat().st_size > 1000, key
    assert len(r["samples"]) == 2 and all(s["prompt"] and s["reference"] for s in r["samples"])
    report = (tmp_path / "eval" / "report.md").read_text()
    for text in ("| student |", "| teacher (adapted) |", "niah_heatmap.png", "loss_curves.png", "sample 2",
                 "## Long context", "long_context.png", "ms per decoded token"):
        assert text in report
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["student_ppl"] == r["student_ppl"]


def test_cli_eval_finds_the_run_teacher_and_baseline_from_the_config(tmp_path, run, capsys):
    from distill_dag.cli import main

    d = _cfg_dict(run)
    d["eval"]["niah"] = True
    d["eval"]["long_context_multiples"] = [1, 2]  # the config's lengths reach the report
    d["eval"]["long_context_contexts"] = 1
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(d))
    assert main(["eval", "--config", str(cfg_file), "--no-niah", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| student |" in out and "| teacher (adapted) |" in out and "report:" in out
    assert not (tmp_path / "out" / "niah.json").exists()  # --no-niah wins over eval.niah: true
    assert (tmp_path / "out" / "report.md").exists()
    lc = json.loads((tmp_path / "out" / "long_context.json").read_text())
    assert lc["perplexity"]["lengths"] == [64, 128]


def test_a_converted_student_is_compared_beside_the_others(tmp_path, run):
    """student.init from_teacher: the aligned stage-1 student gets its own NIAH row, heat-map and ratio to the teacher."""
    cfg = config_from_dict(_cfg_dict(run))
    r = evaluate_checkpoint(run / "run" / "final", cfg, run / "tokenized", tmp_path / "eval",
                            teacher=run / "teacher_ft", converted=run / "run" / "final", long_context=False,
                            log=lambda s: None)
    assert set(r["niah_models"]) == {"student", "converted student", "teacher (adapted)"}
    assert set(r["niah_ratio_grids"]) == {"student", "converted student"}
    assert "| converted student |" in (tmp_path / "eval" / "report.md").read_text()
