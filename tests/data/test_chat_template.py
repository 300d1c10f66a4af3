"""Chat rows (issue 31, part 1): rendered with the tokenizer's own chat template, every assistant turn trained.

The reference for the labels is computed independently of the renderer: in the packed row, the trained
tokens are exactly those after each ``<|start_header_id|>assistant<|end_header_id|>\\n\\n`` header up to and
including its ``<|eot_id|>``, plus the document's EOS; everything else is -100.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from distill_dag.data.manifest import Manifest
from distill_dag.data.pack import tokenize_to_parquet


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# the shape of Meta's Llama-3 template (no {% generation %} markers, as in the real one)
LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
# the same rendering with generation markers (HF's return_assistant_tokens_mask path)
LLAMA3_MARKED = LLAMA3.replace(
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}",
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{%- if message['role'] == 'assistant' %}{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}")

CHAT = [{"messages": [{"role": "system", "content": "You answer briefly."},
                      {"role": "user", "content": "What is two plus two?"},
                      {"role": "assistant", "content": "Four."},
                      {"role": "user", "content": "And three plus three?"},
                      {"role": "assistant", "content": "Six, the answer is six."}]}]


def llama3_tokenizer(out: Path, template: str | None = LLAMA3) -> Path:
    """A tiny byte-level BPE with Llama-3's special header tokens and chat template, saved to ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(["what is two plus two four and three plus three six the answer you answer briefly"] * 50,
                          trainer=trainers.BpeTrainer(vocab_size=350, special_tokens=SPECIALS, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                  pad_token="<|end_of_text|>")
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(out)
    return out


def packed(out: Path) -> tuple[list[int], list[int], Manifest]:
    m = Manifest.load(out)
    t = pq.read_table(out / m.shards[0].path).to_pydict()
    return t["input_ids"][0], t["labels"][0], m


def expected_labels(ids: list[int], tok_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    sh, eh, eot, eos = (tok.convert_tokens_to_ids(x) for x in
                        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"))
    assistant = tok.encode("assistant", add_special_tokens=False)
    nl = tok.encode("\n\n", add_special_tokens=False)
    header = [sh, *assistant, eh, *nl]
    want = [-100] * len(ids)
    i = 0
    while i < len(ids):
        if ids[i:i + len(header)] == header:
            j = i + len(header)
            while ids[j] != eot:
                want[j] = ids[j]
                j += 1
            want[j] = eot
            i = j
        i += 1
    end = ids.index(eos)  # the packer's EOS after the conversation is a label too
    want[end] = eos
    return want


@pytest.mark.parametrize("template", [LLAMA3, LLAMA3_MARKED], ids=["prefix-rendering", "generation-markers"])
def test_llama3_chat_rows_pack_with_header_tokens_and_labels_only_on_both_assistant_turns(tmp_path, template):
    tok_dir = llama3_tokenizer(tmp_path / "tok", template)
    raw = write_jsonl(tmp_path / "raw" / "chat.jsonl", CHAT)
    tokenize_to_parquet(raw, tmp_path / "out", tok_dir, 128, val_fraction=0.0, rows_per_shard=4)
    ids, labels, m = packed(tmp_path / "out")

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    header_ids = {tok.convert_tokens_to_ids(x) for x in SPECIALS[2:]}
    assert header_ids <= set(ids), "the template's header tokens are single ids in the packed row"
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # the template's BOS, not a second one
    assert labels == expected_labels(ids, tok_dir)
    trained = tok.decode([x for x in labels if x != -100])
    assert "Four." in trained and "Six, the answer is six." in trained  # both turns, not only the last
    assert "two plus two" not in trained and "briefly" not in trained
    assert m.chat_template == "tokenizer" and m.totals["chat_docs"] == 1
    # the same ids as the tokenizer's own apply_chat_template (what the Instruct teacher answers in)
    assert ids[:ids.index(tok.eos_token_id)] == tok.apply_chat_template(CHAT[0]["messages"], tokenize=True,
                                                                        return_dict=True)["input_ids"]


def test_sharegpt_rows_without_a_template_use_the_plain_fallback_and_train_every_gpt_turn(tmp_path):
    tok_dir = llama3_tokenizer(tmp_path / "tok", template=None)
    row = {"conversations": [{"from": "human", "value": "two plus two"}, {"from": "gpt", "value": "four"},
                             {"from": "human", "value": "three plus three"}, {"from": "gpt", "value": "six"}]}
    raw = write_jsonl(tmp_path / "raw" / "sg.jsonl", [row])
    tokenize_to_parquet(raw, tmp_path / "out", tok_dir, 128, val_fraction=0.0)
    ids, labels, m = packed(tmp_path / "out")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    text = "<|user|>\ntwo plus two\n<|assistant|>\nfour\n<|user|>\nthree plus three\n<|assistant|>\nsix\n"
    assert tok.decode(ids[:ids.index(tok.eos_token_id)]) == text
    assert tok.decode([x for x in labels if x != -100]) == "four\nsix\n<|end_of_text|>"
    assert m.chat_template == "plain"


def test_prompt_response_rows_take_the_tokenizers_template_and_text_rows_stay_verbatim(tmp_path):
    tok_dir = llama3_tokenizer(tmp_path / "tok")
    raw = write_jsonl(tmp_path / "raw" / "pr.jsonl", [{"prompt": "two plus two", "response": "four"},
                                                     {"text": "the answer"}])
    tokenize_to_parquet(raw, tmp_path / "out", tok_dir, 128, val_fraction=0.0)
    ids, labels, m = packed(tmp_path / "out")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    first = tok.apply_chat_template([{"role": "user", "content": "two plus two"},
                                     {"role": "assistant", "content": "four"}], tokenize=True, return_dict=True)
    assert ids[:len(first["input_ids"])] == first["input_ids"]
    assert tok.decode([x for x in labels if x != -100]).startswith("four<|eot_id|><|end_of_text|>")
    assert "the answer" in tok.decode(ids) and m.totals["chat_docs"] == 1


def test_a_chat_row_without_an_assistant_turn_is_a_reject_with_its_reason(tmp_path):
    tok_dir = llama3_tokenizer(tmp_path / "tok")
    raw = write_jsonl(tmp_path / "raw" / "c.jsonl", CHAT + [{"messages": [{"role": "user", "content": "hi"}]},
                                                            {"messages": "not a list"}])
    r = tokenize_to_parquet(raw, tmp_path / "out", tok_dir, 128, val_fraction=0.0, max_reject_rate=0.9)
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert r["rejects"] == 2
    assert [x["reason"] for x in rejects] == ["field 'messages' has no assistant turn with content: nothing to train on",
                                              "field 'messages' is str, expected a non-empty list of turns"]


def test_a_template_that_rewrites_earlier_turns_is_refused_naming_the_fix(tmp_path):
    # drops the earlier assistant turns when more follow (as reasoning templates do): prefixes are not prefixes
    bad = ("{%- for m in messages %}{%- if m['role'] != 'assistant' or loop.last %}"
           "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}"
           "{%- endif %}{%- endfor %}"
           "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")
    tok_dir = llama3_tokenizer(tmp_path / "tok", bad)
    raw = write_jsonl(tmp_path / "raw" / "c.jsonl", CHAT)
    with pytest.raises(ValueError, match=r"prefixes.*generation %\} markers"):
        tokenize_to_parquet(raw, tmp_path / "out", tok_dir, 128, val_fraction=0.0)
