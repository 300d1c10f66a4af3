"""Synthetic retrieval documents of the demo corpus: gathered as a raw source, deterministic, and every
question's answer is retrievable from earlier in its episode (so a teacher can learn to copy)."""

import json
import re

from distill_dag.config import config_from_dict
from distill_dag.data import retrieval_docs
from distill_dag.data.sources import gather_sources


def _cfg(root, n=4):
    return config_from_dict({"data": {"root": str(root), "sources": [
        {"name": "retrieval", "kind": "hf", "dataset": "synthetic:retrieval", "max_rows": n}]}})


def test_gathered_as_a_raw_source_deterministically(tmp_path):
    res = gather_sources(_cfg(tmp_path / "a"))["retrieval"]
    assert res["rows"] == 4 and res["rejects"] == 0
    part = tmp_path / "a" / "raw" / "retrieval" / "part-00000.jsonl"
    rows = [json.loads(line) for line in part.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"retrieval:{i}" for i in range(4)]
    assert {r["category"] for r in rows} == {"retrieval"}
    gather_sources(_cfg(tmp_path / "b"))
    assert (tmp_path / "b" / "raw" / "retrieval" / "part-00000.jsonl").read_bytes() == part.read_bytes()


def test_every_answer_is_stated_earlier_in_its_episode():
    lines = retrieval_docs._filler_lines()
    kinds = set()
    for i in range(20):
        for ep in retrieval_docs.make_document(i, lines).split("\n\n"):
            last = ep.rstrip("\n").split("\n")[-1]
            if m := re.fullmatch(r"What is the pass key\? The pass key is (\d+)\.", last):
                kinds.add("pass key")
                assert ep.count(f"The pass key is {m.group(1)}.") == 2  # the needle, then the answer
            elif m := re.fullmatch(r"Who is the (\w+)\? The \1 is (.+)\.", last):
                kinds.add("lookup")
                assert f"The name of the {m.group(1)} is {m.group(2)}." in ep
            elif last.startswith("assert "):
                kinds.add("key-value")
                for q in (ln for ln in ep.split("\n") if ln.startswith("assert ")):
                    name, value = q[len("assert "):].split(" == ")
                    assert f"\n{name} = {value}\n" in "\n" + ep
            elif re.fullmatch(r"\w+ = \[[\d, ]+\]", last):
                kinds.add("repeat")
                assert ep.count(last) == 2
            else:
                raise AssertionError(f"an episode without a question: {last!r}")
    assert kinds == {"pass key", "lookup", "key-value", "repeat"}
