"""lm-evaluation-harness on our checkpoints (distill_dag/eval/harness.py): the student loads only through the code
shipped in its folder (trust_remote_code), the scores are lm-eval's own and agree with a log-likelihood computed
here by hand, the share of the teacher is plain arithmetic, the local tasks hold the split's true continuations
and pass keys, and a task whose data is on the Hub fails offline with one error naming it."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from support import stdlib_tokenizer, tiny_llama

from distill_dag.config import config_from_dict
from distill_dag.data.retrieval_docs import NEEDLE, QUESTION
from distill_dag.eval import harness

TRAIN_LEN = 64
LIMIT = 12  # examples per task in the lm-eval runs: enough to tell scores apart, a few seconds per model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """The project's byte-level BPE on a little stdlib text, packed into 64-token rows (20% held out)."""
    from distill_dag.data.pack import tokenize_to_parquet

    root = tmp_path_factory.mktemp("harness")
    raw, tok, tok_hash = stdlib_tokenizer(root, vocab_size=300, max_bytes=60_000)
    tokenize_to_parquet(raw, root / "tokenized", tok, TRAIN_LEN, val_fraction=0.2, rows_per_shard=512,
                        tokenizer_hash=tok_hash)
    return {"root": root, "tokenizer": tok, "tokenized": root / "tokenized"}


def _tok(corpus):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(corpus["tokenizer"]))


def _student_folder(path: Path, tok, seed: int) -> Path:
    """A tiny RetNet student saved as the pipeline saves ``final``: weights, tokenizer, shipped code + auto_map."""
    from distill_dag.model.hub import prepare_hf_folder
    from distill_dag.model.retnet import RetNetForCausalLM
    from distill_dag.model.variants import student_config

    torch.manual_seed(seed)
    # a wide init: the choices' log-likelihoods differ by far more than float noise, so argmaxes are stable
    cfg = student_config("tiny", len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, chunk_size=8, initializer_range=0.5)
    RetNetForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    prepare_hf_folder(path, max_length=TRAIN_LEN)
    return path


@pytest.fixture(scope="module")
def section(corpus, tmp_path_factory):
    """The report's lm-eval section over: the KD student (folder given), a second saved student found only from
    the folder it was loaded from (as a model added to ``compared`` later is), a student held only in memory,
    and a teacher that is a LoRA adapter (a teacher_ft folder's final_adapter/) over a tiny Llama saved with
    save_pretrained. The continuation task is given as a task YAML path."""
    from transformers import AutoModelForCausalLM

    import distill_dag  # noqa: F401  - the in-process loads below go through our registration
    from distill_dag.model.retnet import RetNetForCausalLM

    root = tmp_path_factory.mktemp("models")
    tok = _tok(corpus)
    student = _student_folder(root / "student", tok, seed=1)
    other = _student_folder(root / "other", tok, seed=2)
    base = root / "teacher_base"
    tiny_llama(len(tok), seed=3, embed_scale=20.0).save_pretrained(base)
    teacher = root / "teacher_ft"
    _lora(base).save_pretrained(teacher / "final_adapter")
    yaml_dir = root / "task_yaml"
    paths = harness.build_local_tasks(corpus["tokenized"], tok, yaml_dir, names=[harness.CONTINUATION_TASK],
                                      train_len=TRAIN_LEN)
    cfg = config_from_dict({
        "tokenize": {"max_seq_length": TRAIN_LEN}, "teacher": {"model_name_or_path": str(base)},
        "eval": {"lm_eval_tasks": [str(paths[harness.CONTINUATION_TASK]), harness.PASSKEY_TASK],
                 "lm_eval_limit": LIMIT, "batch_size": 4}})
    loaded_other = AutoModelForCausalLM.from_pretrained(other)
    compared = {"student": object(), "hybrid student": loaded_other,
                "in-memory student": RetNetForCausalLM(loaded_other.config), "teacher": object()}
    result: dict = {}
    out = root / "eval"
    lines = harness.lm_eval_section(
        cfg, compared, {"student": student, "in-memory student": None, "teacher": teacher}, teacher_name="teacher",
        data_dir=corpus["tokenized"], out_dir=out, tokenizer=tok, tokenizer_dir=corpus["tokenizer"], split="val",
        device="cpu", result=result, log=lambda s: None)
    return {"result": result, "lines": lines, "out": out, "student": student, "other": other, "base": base,
            "teacher": teacher,
            "task_jsonl": paths[harness.CONTINUATION_TASK].with_suffix(".jsonl"), "tok": tok}


def _lora(base: Path):
    """A LoRA adapter on ``base`` whose B is not zero (peft's default init would make it the identity), scaled up so
    that it changes the model's choices: lm-eval must apply it for its scores to match."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(4)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                      init_lora_weights=False))
    with torch.no_grad():
        for n, w in model.named_parameters():
            if "lora_B" in n:
                w.mul_(500.0)
    return model


def _choice_loglikelihoods(model, tok, context: str, choices: list[str]) -> list[float]:
    """Sum of log p(continuation tokens | context), tokenized as lm-eval's HFLM does (whole string encoded, the
    context's tokens cut off the front; trailing spaces of the context move to the continuation)."""
    out = []
    for choice in choices:
        ctx, cont = context, choice
        n = len(ctx) - len(ctx.rstrip())
        if n:
            ctx, cont = ctx[:-n], ctx[-n:] + cont
        whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
        ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
        cont_ids = whole[len(ctx_ids):]
        ids = torch.tensor([(ctx_ids + cont_ids)[:-1]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        pos = range(len(ctx_ids) - 1, len(ctx_ids) - 1 + len(cont_ids))
        out.append(float(sum(logp[p, t] for p, t in zip(pos, cont_ids))))
    return out


def test_lm_eval_loads_the_student_only_through_trust_remote_code(section):
    r = section["result"]
    cls = r["lm_eval_model_class"]
    # transformers' dynamic module of the checkpoint folder, not distill_dag's class (the child never imports it)
    for name in ("student", "hybrid student"):
        assert cls[name].startswith("transformers_modules.") and cls[name].endswith("modeling_retnet.RetNetForCausalLM")
        assert "distill_dag" not in cls[name]
    assert cls["teacher"] == "transformers.models.llama.modeling_llama.LlamaForCausalLM"
    # the model held only in memory has no folder: not run, and the report says so
    assert set(cls) == {"student", "hybrid student", "teacher"}
    assert "Not run (in memory only): in-memory student" in "\n".join(section["lines"])

    # lm-eval's acc equals the argmax of log-likelihoods computed here on the same folders and examples; the
    # teacher is its base model with the LoRA adapter applied (without it, its acc would differ)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    docs = [json.loads(x) for x in section["task_jsonl"].read_text().splitlines()][:LIMIT]

    def acc(model) -> float:
        hits = [max(range(len(d["choices"])), key=lambda i, ll=_choice_loglikelihoods(model, section["tok"],
                                                                                    d["context"], d["choices"]): ll[i])
                == d["gold"] for d in docs]
        return sum(hits) / len(hits)

    row = next(x for x in r["lm_eval_rows"] if x["task"] == harness.CONTINUATION_TASK)
    assert row["student"] == pytest.approx(acc(AutoModelForCausalLM.from_pretrained(section["student"]).eval()))
    base = AutoModelForCausalLM.from_pretrained(section["base"]).eval()
    base_acc = acc(base)
    lora = PeftModel.from_pretrained(base, section["teacher"] / "final_adapter").eval()
    assert row["teacher"] == pytest.approx(acc(lora)) and row["teacher"] != pytest.approx(base_acc)
    # the table and the files
    assert [x["task"] for x in r["lm_eval_rows"]] == [harness.CONTINUATION_TASK, harness.PASSKEY_TASK, "mean share"]
    assert set(r["lm_eval_mean_share"]) == {"student", "hybrid student"}
    saved = json.loads((section["out"] / "lm_eval.json").read_text())
    assert saved["rows"] == r["lm_eval_rows"] and saved["limit"] == LIMIT
    assert "| task | metric | teacher | student | hybrid student | student share |" in r["lm_eval_table"]


def test_share_of_the_teacher_against_a_hand_calculation():
    def s(v, hib=True):
        return {"metric": "acc" if hib else "perplexity", "value": v, "higher_is_better": hib}

    scores = {"teacher": {"a": s(0.80), "b": s(0.50), "c": s(0.0), "d": s(4.0, False)},
              "kd": {"a": s(0.60), "b": s(0.55), "c": s(0.25), "d": s(5.0, False)},
              "ce": {"a": s(0.20), "b": s(0.25), "c": s(0.0), "d": s(8.0, False)}}
    rows, mean = harness.share_rows(scores, "teacher", ["a", "b", "c", "d"])
    # by hand: 0.6/0.8 = 0.75, 0.55/0.5 = 1.1, the teacher's 0 gives no share, perplexity 4/5 = 0.8 (lower is better)
    assert rows[0]["kd share"] == pytest.approx(0.75) and rows[1]["kd share"] == pytest.approx(1.1)
    assert rows[2]["kd share"] is None and rows[3]["kd share"] == pytest.approx(0.8)
    assert mean["kd"] == pytest.approx((0.75 + 1.1 + 0.8) / 3)
    assert mean["ce"] == pytest.approx((0.25 + 0.5 + 0.5) / 3)
    assert rows[-1] == {"task": "mean share", "metric": "", "teacher": None, "kd": None, "ce": None,
                        "kd share": mean["kd"], "ce share": mean["ce"]}
    assert rows[0]["teacher"] == 0.80 and rows[0]["kd"] == 0.60
    md = harness.rows_markdown(rows)
    assert "| a | acc | 0.800 | 0.600 | 0.200 | 0.75 | 0.25 |" in md
    assert "| c | acc | 0.000 | 0.250 | 0.000 | - | - |" in md


def test_hub_and_unknown_tasks_fail_offline_with_one_error_naming_them(tmp_path):
    tiny_llama(300).save_pretrained(tmp_path / "teacher")
    with pytest.raises(harness.LmEvalTaskError) as err:
        harness.run_lm_eval({"teacher": tmp_path / "teacher"}, ["arc_easy", "arc_easyy_typo"], 2, offline=True,
                            device="cpu", workdir=tmp_path, log=lambda s: None)
    msg = str(err.value)
    assert "task 'arc_easy' cannot load its data" in msg and "offline" in msg
    assert "dataset_path: json" in msg and "data_files" in msg and "eval.lm_eval_tasks" in msg
    assert "'arc_easyy_typo' is not an lm-eval task" in msg and "did you mean arc_easy" in msg
    with pytest.raises(harness.LmEvalTaskError, match=r"task YAML .*missing\.yaml does not exist"):
        harness.resolve_tasks([str(tmp_path / "missing.yaml")])


def _split_rows(tokenized: Path) -> list[list[int]]:
    """Every row of the val split, read straight from the parquet files the manifest lists (not the loader)."""
    manifest = json.loads((tokenized / "manifest.json").read_text())
    rows: list[list[int]] = []
    for shard in manifest["shards"]:
        if shard["split"] == "val":
            t = pq.read_table(tokenized / shard["path"], columns=["input_ids", "attention_mask"]).to_pylist()
            rows += [[i for i, m in zip(r["input_ids"], r["attention_mask"]) if m] for r in t]
    return rows


def _oracle(texts: list[str], wrong: bool = False):
    """An lm-eval LM that knows the held-out text: a continuation found right after its context in the split's
    decoded rows scores 0, any other -100; asked for a pass key, it reads the key of the needle in the prompt
    (or answers the key + 1 when ``wrong``)."""
    from lm_eval.api.model import LM

    needle = re.compile(re.escape(NEEDLE).replace(r"\{key\}", r"(\d+)"))

    class Oracle(LM):
        def loglikelihood(self, requests):
            return [(0.0 if any(ctx + cont in t for t in texts) else -100.0, True)
                    for ctx, cont in (r.args for r in requests)]

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

        def generate_until(self, requests):
            keys = [needle.search(r.args[0]).group(1) for r in requests]
            return [" " + (str(int(k) + 1) if wrong else k) + ".\nmore text" for k in keys]

    return Oracle()


def _run(lm, yaml_path: Path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    name = harness.resolve_tasks([str(yaml_path)])[0][0]
    tm = TaskManager(include_path=str(yaml_path.parent), include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=tm, log_samples=False,
                                   bootstrap_iters=0)["results"][name]


def test_local_continuation_task_holds_the_true_next_span(corpus, tmp_path):
    tok = _tok(corpus)
    paths = harness.build_local_tasks(corpus["tokenized"], tok, tmp_path / "a", train_len=TRAIN_LEN, seed=5,
                                      names=[harness.CONTINUATION_TASK])
    rows = [json.loads(x) for x in paths[harness.CONTINUATION_TASK].with_suffix(".jsonl").read_text().splitlines()]
    split = _split_rows(corpus["tokenized"])
    ctx_n, cont_n = TRAIN_LEN // 2, TRAIN_LEN // 8
    assert len(rows) >= 20
    for r in rows:
        ids = split[r["row"]][r["column"] : r["column"] + ctx_n + cont_n]
        assert len(ids) == ctx_n + cont_n
        assert r["context"] == tok.decode(ids[:ctx_n]) and r["choices"][r["gold"]] == tok.decode(ids[ctx_n:])
        assert len(set(r["choices"])) == 4
    assert len({r["gold"] for r in rows}) == 4  # the gold's position is shuffled
    # the same seed writes the same task; another seed another one
    again = harness.build_local_tasks(corpus["tokenized"], tok, tmp_path / "b", train_len=TRAIN_LEN, seed=5,
                                      names=[harness.CONTINUATION_TASK])
    other = harness.build_local_tasks(corpus["tokenized"], tok, tmp_path / "c", train_len=TRAIN_LEN, seed=6,
                                      names=[harness.CONTINUATION_TASK])
    text = paths[harness.CONTINUATION_TASK].with_suffix(".jsonl").read_text()
    assert again[harness.CONTINUATION_TASK].with_suffix(".jsonl").read_text() == text
    assert other[harness.CONTINUATION_TASK].with_suffix(".jsonl").read_text() != text
    # through lm-eval: a model that knows the split picks the gold every time (the YAML wires context, choices and
    # gold as meant: no delimiter inserted between context and continuation); acc 1.0, not chance
    texts = [tok.decode(r) for r in split]
    res = _run(_oracle(texts), paths[harness.CONTINUATION_TASK])
    assert res["acc,none"] == 1.0 and res["acc_norm,none"] == 1.0


def test_passkey_task_is_the_niah_question_scored_by_exact_key(corpus, tmp_path):
    tok = _tok(corpus)
    paths = harness.build_local_tasks(corpus["tokenized"], tok, tmp_path, train_len=TRAIN_LEN,
                                      names=[harness.PASSKEY_TASK], passkey_examples_n=6)
    rows = [json.loads(x) for x in paths[harness.PASSKEY_TASK].with_suffix(".jsonl").read_text().splitlines()]
    assert len(rows) == 6 and len({r["key"] for r in rows}) == 6
    for r in rows:
        assert NEEDLE.format(key=r["key"]) in r["context"] and r["context"].endswith(QUESTION)
        assert abs(len(tok(r["context"], add_special_tokens=False)["input_ids"]) - TRAIN_LEN) <= 2
    assert _run(_oracle([]), paths[harness.PASSKEY_TASK])["exact_match,first_digits"] == 1.0
    assert _run(_oracle([], wrong=True), paths[harness.PASSKEY_TASK])["exact_match,first_digits"] == 0.0


def test_share_is_none_not_infinite_when_the_teacher_scores_zero():
    assert harness.share(0.3, 0.0) is None and harness.share(0.0, 0.5) == 0.0
    assert harness.share(2.0, 1.0, higher_is_better=False) == 0.5 and not math.isnan(harness.share(0.1, 0.2))


def test_hflm_args_for_teacher_folders(tmp_path):
    """A teacher_ft folder's final_model/ is plain ``pretrained=``; its final_adapter/ is ``pretrained=BASE`` (the
    configured base, else the adapter's own base_model_name_or_path) + ``peft=``."""
    (tmp_path / "full" / "final_model").mkdir(parents=True)
    (tmp_path / "full" / "final_model" / "config.json").write_text("{}")
    assert harness.hflm_args(tmp_path / "full") == {"pretrained": str(tmp_path / "full" / "final_model")}
    adapter = tmp_path / "lora" / "final_adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base"}))
    assert harness.hflm_args(tmp_path / "lora") == {"pretrained": "org/base", "peft": str(adapter)}
    assert harness.hflm_args(adapter, base="/models/b") == {"pretrained": "/models/b", "peft": str(adapter)}
    with pytest.raises(FileNotFoundError, match="no config.json"):
        harness.hflm_args(tmp_path)


def test_cli_lm_eval_flags_set_the_config(tmp_path, monkeypatch, capsys):
    """``distill eval --lm-eval-tasks T1,T2 --lm-eval-limit N`` reaches eval.lm_eval_tasks / lm_eval_limit (a task
    YAML path resolved against the current directory); a bad limit is refused naming its key before any work."""
    import yaml

    from distill_dag import cli
    from distill_dag.eval import report

    seen = {}

    def fake_run(cfg, **kw):
        seen["eval"] = cfg.eval
        return {"perplexity_rows": [], "report_path": "r.md", "lm_eval_table": "| task |"}

    monkeypatch.setattr(report, "evaluate_run", fake_run)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("task: mine\n")
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump({"eval": {"lm_eval_tasks": ["arc_easy"]}}))
    assert cli.main(["eval", "--config", str(cfg_file), "--lm-eval-tasks", "piqa, mine.yaml",
                     "--lm-eval-limit", "7"]) == 0
    assert seen["eval"].lm_eval_tasks == ["piqa", str(tmp_path / "mine.yaml")] and seen["eval"].lm_eval_limit == 7
    assert "share of the teacher" in capsys.readouterr().out
    assert cli.main(["eval", "--config", str(cfg_file), "--lm-eval-tasks", ""]) == 0
    assert seen["eval"].lm_eval_tasks == []
    assert cli.main(["eval", "--config", str(cfg_file), "--lm-eval-limit", "0"]) != 0
    assert "eval.lm_eval_limit" in capsys.readouterr().err
