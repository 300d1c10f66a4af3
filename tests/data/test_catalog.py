"""The curated catalog: its contents, and each formatter on rows written in the dataset's real layout."""

from __future__ import annotations

import json

import pytest

from distill_dag.data import catalog as C


def _entry(formatter: str, name: str = "x", category: str = "math") -> C.CatalogEntry:
    return C.CatalogEntry(name=name, hub_id=f"org/{name}", category=category, samples=10, formatter=formatter)


def msgs(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in turns]


def test_catalog_has_the_seed_categories_and_datasets():
    cat = C.load_catalog()
    assert set(cat.categories) == {"instruction_chat", "code", "math", "factual_qa"}
    hub = {d.hub_id: d for d in cat.datasets}
    for hub_id in ["meta-math/MetaMathQA", "openai/gsm8k", "code-search-net/code_search_net", "codeparrot/apps",
                   "google-research-datasets/mbpp", "sahil2801/CodeAlpaca-20k", "teknium/OpenHermes-2.5",
                   "HuggingFaceH4/ultrachat_200k", "databricks/databricks-dolly-15k", "rajpurkar/squad_v2"]:
        assert hub_id in hub, hub_id
    assert hub["openai/gsm8k"].subset == "main"
    assert hub["HuggingFaceH4/ultrachat_200k"].split == "train_sft"
    assert {d.category for d in cat.select(["code"])} == {"code"}
    assert len(cat.select(None)) == len(cat.datasets)
    with pytest.raises(ValueError, match="unknown catalog categories"):
        cat.select(["poetry"])


def test_metamath_row():
    row = {"type": "GSM_Rephrased", "query": "What is 2+3?", "original_question": "2+3?", "response": "2+3=5. The answer is: 5"}
    assert C.fmt_metamath(row) == {"messages": msgs(("user", "What is 2+3?"), ("assistant", "2+3=5. The answer is: 5"))}


def test_gsm8k_row_keeps_the_final_answer_marker():
    row = {"question": "Tom has 3 apples and buys 2. How many?", "answer": "3+2=<<3+2=5>>5\n#### 5"}
    out = C.format_row(_entry("gsm8k", "gsm8k"), row, 7, "catalog")
    assert out == {"messages": msgs(("user", "Tom has 3 apples and buys 2. How many?"),
                                    ("assistant", "3+2=<<3+2=5>>5\n#### 5")), "id": "gsm8k:7", "source": "catalog/gsm8k", "category": "math"}


def test_code_search_net_row_is_code_text_with_its_path():
    row = {"repository_name": "psf/requests", "func_path_in_repository": "requests/utils.py", "func_name": "to_key_val_list",
           "whole_func_string": "def to_key_val_list(value):\n    return list(value)", "language": "python",
           "func_code_string": "def to_key_val_list(value):\n    return list(value)", "func_code_tokens": ["def"],
           "func_documentation_string": "", "func_documentation_tokens": [], "split_name": "train",
           "func_code_url": "https://github.com/psf/requests"}
    assert C.fmt_code_search_net(row) == {"text": "# psf/requests/requests/utils.py\ndef to_key_val_list(value):\n    return list(value)"}


def test_apps_row_takes_the_first_solution_and_skips_problems_without_one():
    row = {"problem_id": 0, "question": "Print the sum of a and b.", "solutions": json.dumps(["a,b=map(int,input().split())\nprint(a+b)", "x"]),
           "input_output": json.dumps({"inputs": ["1 2\n"], "outputs": ["3\n"]}), "difficulty": "introductory",
           "url": "https://codeforces.com/problemset/problem/1/A", "starter_code": ""}
    assert C.fmt_apps(row) == {"messages": msgs(("user", "Print the sum of a and b."),
                                                ("assistant", "a,b=map(int,input().split())\nprint(a+b)"))}
    with_starter = dict(row, starter_code="def add(a, b):\n")
    assert C.fmt_apps(with_starter)["messages"][0] == msgs(("user", "Print the sum of a and b.\n\nStart from:\ndef add(a, b):\n"))[0]
    assert C.fmt_apps(dict(row, solutions="")) is None
    assert C.fmt_apps(dict(row, solutions="[]")) is None


def test_mbpp_row_lists_the_tests_in_the_prompt():
    row = {"task_id": 2, "text": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b",
           "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"], "test_setup_code": "", "challenge_test_list": []}
    assert C.fmt_mbpp(row) == {
        "messages": msgs(("user", "Write a function to add two numbers.\nYour code should pass these tests:\n\n"
                                  "assert add(1, 2) == 3\nassert add(0, 0) == 0"),
                         ("assistant", "def add(a, b):\n    return a + b"))}
    sanitized = {"source_file": "x", "task_id": 2, "prompt": "Add two numbers.", "code": "c", "test_imports": [], "test_list": []}
    assert C.fmt_mbpp(sanitized) == {"messages": msgs(("user", "Add two numbers."), ("assistant", "c"))}


def test_alpaca_rows_with_and_without_input():
    row = {"instruction": "Reverse the string.", "input": "abc", "output": "cba"}
    assert C.fmt_alpaca(row) == {"messages": msgs(("user", "Reverse the string.\n\nabc"), ("assistant", "cba"))}
    assert C.fmt_alpaca(dict(row, input="")) == {"messages": msgs(("user", "Reverse the string."), ("assistant", "cba"))}


def test_openhermes_sharegpt_conversation_keeps_every_turn_up_to_the_last_gpt_turn():
    row = {"conversations": [{"from": "system", "value": "Be brief.", "weight": None},
                             {"from": "human", "value": "Hi", "weight": 0.0},
                             {"from": "gpt", "value": "Hello!", "weight": 1.0},
                             {"from": "human", "value": "2+2?", "weight": 0.0},
                             {"from": "gpt", "value": "4", "weight": 1.0}],
           "source": "airoboros2.2", "category": "orca", "model": None, "title": None, "topic": None,
           "language": None, "custom_instruction": None, "hash": None, "id": None}
    assert C.fmt_sharegpt(row) == {
        "messages": msgs(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "2+2?"),
                         ("assistant", "4"))}
    assert C.fmt_sharegpt({"conversations": [{"from": "human", "value": "Hi"}]}) is None


def test_ultrachat_messages_drop_a_trailing_user_turn():
    row = {"prompt": "Tell me a fact.", "prompt_id": "abc",
           "messages": [{"content": "Tell me a fact.", "role": "user"}, {"content": "Water boils at 100 C.", "role": "assistant"},
                        {"content": "Another?", "role": "user"}]}
    assert C.fmt_messages(row) == {"messages": msgs(("user", "Tell me a fact."), ("assistant", "Water boils at 100 C."))}


def test_dolly_row_appends_context_when_present():
    row = {"instruction": "When was X founded?", "context": "X was founded in 1990.", "response": "1990",
           "category": "closed_qa"}
    assert C.fmt_dolly(row) == {"messages": msgs(("user", "When was X founded?\n\nX was founded in 1990."), ("assistant", "1990"))}
    out = C.format_row(_entry("dolly", "dolly", "instruction_chat"), dict(row, context=""), 0, "cat")
    assert out["messages"][0] == msgs(("user", "When was X founded?"))[0] and out["category"] == "instruction_chat"


def test_openorca_row_uses_the_system_prompt():
    row = {"id": "niv.242684", "system_prompt": "You are helpful.", "question": "Translate 'hi'.", "response": "salut"}
    assert C.fmt_openorca(row) == {"messages": msgs(("system", "You are helpful."), ("user", "Translate 'hi'."), ("assistant", "salut"))}
    assert C.fmt_openorca(dict(row, system_prompt="")) == {"messages": msgs(("user", "Translate 'hi'."), ("assistant", "salut"))}


def test_squad_v2_answerable_and_unanswerable():
    row = {"id": "56be", "title": "Beyonce", "context": "Beyonce was born in 1981.", "question": "When was she born?",
           "answers": {"text": ["1981", "in 1981"], "answer_start": [20, 17]}}
    user = ("user", "Beyonce was born in 1981.\n\nQuestion: When was she born?")
    assert C.fmt_squad_v2(row) == {"messages": msgs(user, ("assistant", "1981"))}
    assert C.fmt_squad_v2(dict(row, answers={"text": [], "answer_start": []})) == {
        "messages": msgs(user, ("assistant", C.SQUAD_NO_ANSWER))}


def test_mathinstruct_and_trivia_qa_rows():
    assert C.fmt_mathinstruct({"source": "data/CoT/gsm_rft.json", "output": "5", "instruction": "2+3?"}) == \
        {"messages": msgs(("user", "2+3?"), ("assistant", "5"))}
    tq = {"question": "Capital of France?", "question_id": "tc_1", "question_source": "http://x",
          "answer": {"aliases": ["Paris"], "normalized_aliases": ["paris"], "matched_wiki_entity_name": "",
                     "normalized_matched_wiki_entity_name": "", "normalized_value": "paris", "type": "WikipediaEntity",
                     "value": "Paris"}}
    assert C.fmt_trivia_qa(tq) == {"messages": msgs(("user", "Capital of France?"), ("assistant", "Paris"))}


def test_plan_counts_and_expected_size():
    cat = C.load_catalog()
    p = C.plan(cat.select(["code"]))
    assert {d["name"] for d in p["datasets"]} == {d.name for d in cat.datasets if d.category == "code"}
    assert p["samples"] == sum(d.samples for d in cat.datasets if d.category == "code")
    assert p["expected_bytes"] == sum(d.samples * d.bytes_per_sample for d in cat.datasets if d.category == "code")


def test_download_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys, monkeypatch):
    from distill_dag.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  root: {tmp_path / 'data'}\n")
    assert main(["download", "--config", str(cfg), "--category", "code", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for d in C.load_catalog().select(["code"]):
        assert d.hub_id in out and f"{d.samples:,}" in out
    assert "gsm8k" not in out and "expected_bytes=" in out
    assert not (tmp_path / "data").exists()


def test_catalog_source_formats_a_local_dataset_in_gsm8k_layout(tmp_path):
    """The catalog path end to end (load_dataset -> formatter -> resumable JSONL) on a local data file."""
    from distill_dag.config import PipelineConfig, SourceConfig
    from distill_dag.data.sources import gather_sources

    data = tmp_path / "gsm8k.jsonl"
    rows = [{"question": f"What is {i}+1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"} for i in range(7)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "cat.yaml").write_text(
        "categories: {math: m}\n"
        f"datasets:\n  - {{name: gsm8k, hub_id: '{data}', split: train, category: math, samples: 5, formatter: gsm8k}}\n")
    cfg = PipelineConfig()
    cfg.data.root = str(tmp_path / "d")
    cfg.data.rows_per_part = 2
    cfg.data.sources = [SourceConfig(name="cat", kind="catalog", path=str(tmp_path / "cat.yaml"), categories=["math"])]
    res = gather_sources(cfg)["cat"]
    assert (res["rows"], res["files"], res["rejects"]) == (5, 3, 0)
    out = [json.loads(x) for p in sorted((tmp_path / "d/raw/cat/gsm8k").glob("part-*.jsonl")) for x in p.read_text().splitlines()]
    assert out == [{"messages": msgs(("user", r["question"]), ("assistant", r["answer"])), "id": f"gsm8k:{i}",
                    "source": "cat/gsm8k", "category": "math"} for i, r in enumerate(rows[:5])]
