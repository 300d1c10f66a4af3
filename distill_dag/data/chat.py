"""Chat rows rendered with the teacher tokenizer's own chat template, and the spans that are trained.

A chat row is a JSONL object with ``messages`` (``[{"role", "content"}, ...]``, the OpenAI/HF layout)
or ``conversations`` (ShareGPT: ``[{"from", "value"}, ...]``); roles are normalised (human -> user,
gpt -> assistant). When the tokenizer has its own chat template, prompt/response rows are rendered as
one user/assistant exchange too, so a student distilled from an Instruct teacher sees the format that
teacher answers in.

Template choice (recorded in the manifest as ``chat_template``):

- ``"tokenizer"``: the tokenizer's ``chat_template`` (``apply_chat_template``), its special tokens
  (``<|start_header_id|>`` ...) encoded as the single ids they are;
- ``"plain"``: only for tokenizers without one (the demo's BPE): ``<|role|>\\n{content}\\n`` per
  turn, encoded as ordinary text (content that spells a special token stays text).

Every assistant turn is trained, not only the last. The trained spans come from the template
itself, never from string guesses: with ``{% generation %}`` markers, HF's
``return_assistant_tokens_mask``; otherwise (real Llama-3 templates have none) by rendering
prefixes: ``messages[:i]`` with the generation prompt and ``messages[:i+1]`` give the token range of
assistant turn ``i`` (the header of the turn is prompt, its content and end-of-turn token are
trained). A template whose prefixes do not render as prefixes of the whole conversation cannot be
masked this way: that is an error naming the tokenizer, never a silent guess.
"""

from __future__ import annotations

import copy
import re
from typing import Any

_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "bot": "assistant", "model": "assistant", "chatgpt": "assistant", "tool": "tool", "ipython": "ipython",
          "function": "tool"}

# the fallback for tokenizers without a chat template: the project's plain template, as a Jinja chat
# template with generation markers so both paths share one masking rule
PLAIN_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{ '<|' + m['role'] + '|>\n' }}"
    "{%- if m['role'] == 'assistant' -%}{% generation %}{{ m['content'] + '\n' }}{% endgeneration %}"
    "{%- else -%}{{ m['content'] + '\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTemplateError(ValueError):
    """The chat template cannot be masked by its own spans (prefixes do not render as prefixes)."""


def is_chat_row(row: dict[str, Any]) -> bool:
    return "messages" in row or "conversations" in row


def chat_row_problem(row: dict[str, Any]) -> str | None:
    """Why a ``messages`` / ``conversations`` row is unusable, or None (jsonl's row_problem calls this)."""
    key = "messages" if "messages" in row else "conversations"
    turns = row[key]
    if not isinstance(turns, list) or not turns:
        return f"field '{key}' is {type(turns).__name__ if not isinstance(turns, list) else 'an empty list'}, " \
               "expected a non-empty list of turns"
    rk, ck = ("role", "content") if key == "messages" else ("from", "value")
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            return f"{key}[{i}] is a JSON {type(t).__name__}, expected an object with '{rk}' and '{ck}'"
        if not isinstance(t.get(rk), str) or not isinstance(t.get(ck), str):
            return f"{key}[{i}] needs string '{rk}' and '{ck}' fields"
    if not any(_ROLES.get(t[rk].lower(), t[rk].lower()) == "assistant" and t[ck].strip() for t in turns):
        return f"field '{key}' has no assistant turn with content: nothing to train on"
    return None


def messages_of(row: dict[str, Any], own_template: bool) -> list[dict[str, str]] | None:
    """The row as ``[{"role", "content"}]`` (roles normalised), or None for a row that is not chat
    (a ``text`` row; a prompt/response row when the tokenizer has no template of its own).

    Turns after the last assistant turn are dropped: nothing after it is trained, and the teacher
    would score tokens no answer follows."""
    if "messages" in row:
        msgs = [(m["role"], m["content"]) for m in row["messages"]]
    elif "conversations" in row:
        msgs = [(m["from"], m["value"]) for m in row["conversations"]]
    elif "prompt" in row and own_template:
        msgs = [("user", row["prompt"]), ("assistant", row["response"])]
    else:
        return None
    norm = [{"role": _ROLES.get(r.lower(), r.lower()), "content": c} for r, c in msgs]
    last = max(i for i, m in enumerate(norm) if m["role"] == "assistant" and m["content"].strip())
    return norm[: last + 1]


def chat_text(row: dict[str, Any]) -> str:
    """All the contents of a chat row, joined (for BPE training and stats)."""
    msgs = messages_of(row, own_template=False) or []
    return "\n".join(m["content"] for m in msgs)


class ChatRenderer:
    """Renders chat rows of one tokenizer into ``(ids, trained spans)``.

    ``tok`` is the ``PreTrainedTokenizerFast``; ``backend`` the ``tokenizers.Tokenizer`` the packer encodes
    plain text with (``encode_special_tokens`` on). The tokenizer's own template is encoded by a private
    copy that keeps special tokens special (the header tokens must be single ids)."""

    def __init__(self, tok: Any, backend: Any):
        own = getattr(tok, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one renders conversations
            own = own.get("default")
        self.tok = tok
        self.own = bool(own)
        self.mode = "tokenizer" if self.own else "plain"
        self.template = own if self.own else PLAIN_TEMPLATE
        self.generation_markers = bool(_GENERATION.search(self.template))
        self.name = getattr(tok, "name_or_path", "") or "the tokenizer"
        if self.own:
            self._special = copy.deepcopy(tok.backend_tokenizer)
            self._special.encode_special_tokens = False
            self._hf = copy.deepcopy(tok)
            self._hf.backend_tokenizer.encode_special_tokens = False
        self._plain = backend

    def _render(self, msgs: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(msgs, chat_template=self.template, tokenize=False,
                                            add_generation_prompt=add_generation_prompt)

    def _encode(self, text: str) -> Any:
        # the template writes BOS itself (Llama-3's "{{ bos_token }}"): no special tokens added on top
        return (self._special if self.own else self._plain).encode(text, add_special_tokens=False)

    def render(self, msgs: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        """``(ids, spans)``: ``spans`` is flat ``[start, end, start, end, ...]`` of the assistant turns'
        tokens (positions within ``ids``)."""
        if self.own and self.generation_markers:
            out = self._hf.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=True)
            ids = list(out["input_ids"])
            return ids, _runs(list(out["assistant_masks"]))
        return self._render_by_prefixes(msgs)

    def _render_by_prefixes(self, msgs: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        full = self._render(msgs)
        enc = self._encode(full)
        ids = list(enc.ids)
        spans: list[int] = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = self._render(msgs[:i], add_generation_prompt=True)
            upto = self._render(msgs[: i + 1])
            if not (upto.startswith(before) and full.startswith(upto)):
                raise ChatTemplateError(
                    f"the chat template of {self.name} does not render a conversation's prefixes as prefixes of "
                    f"the whole (assistant turn {i}), so its assistant spans cannot be found by rendering "
                    "prefixes: give the template {% generation %} markers around the assistant content "
                    "(return_assistant_tokens_mask), or use a tokenizer whose template keeps earlier turns as written")
            a, b = self._span(ids, enc, before, upto)
            if b > a:
                spans += [a, b]
        return ids, spans

    def _span(self, ids: list[int], enc: Any, before: str, upto: str) -> tuple[int, int]:
        """Token range of ``upto[len(before):]`` in ``ids``: the diff of the prefixes' token ids when they
        are token prefixes of the whole (the usual case: turns end in special tokens); else by characters."""
        pb, pu = self._encode(before).ids, self._encode(upto).ids
        if ids[: len(pu)] == list(pu) and list(pu[: len(pb)]) == list(pb):
            return len(pb), len(pu)
        # a merge across the boundary: the tokens whose first character lies in the turn
        lo, hi = len(before), len(upto)
        inside = [j for j, (s, _) in enumerate(enc.offsets) if lo <= s < hi]
        return (inside[0], inside[-1] + 1) if inside else (0, 0)


def _runs(mask: list[int]) -> list[int]:
    spans: list[int] = []
    start = None
    for j, v in enumerate(mask + [0]):
        if v and start is None:
            start = j
        elif not v and start is not None:
            spans += [start, j]
            start = None
    return spans
