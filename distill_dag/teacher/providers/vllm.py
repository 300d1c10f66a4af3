"""A stock vLLM OpenAI-compatible server as the teacher (``teacher.api: vllm``).

One ``POST /v1/completions`` per group of rows, with ``prompt`` = a list of token-id lists,
``max_tokens: 1``, ``prompt_logprobs: k``, ``logprobs: k``, ``temperature: 0`` and
``return_tokens_as_token_ids: true``. What comes back (checked on vLLM 0.32, /work/shared/FIELD.md):

* ``choices[i].prompt_logprobs``: a list as long as the prompt, ``null`` first (nothing predicts
  the first token); item ``j`` maps a token id *as a string* to ``{"logprob", "rank",
  "decoded_token"}`` for the distribution of token ``j`` given tokens ``< j``: k entries, or k+1 when
  the prompt's own token is outside the top-k, in no particular order. We keep the k largest.
* Our position ``t`` is the distribution of token ``t + 1``, i.e. vLLM's item ``t + 1``. The last
  position of a prompt is not a prompt position for vLLM: we take it from the one generated token's
  ``choices[i].logprobs.top_logprobs[0]`` (keys ``"token_id:<id>"`` thanks to
  ``return_tokens_as_token_ids``), which is the same distribution (vLLM's default ``logprobs_mode``
  returns the raw model log-probs, before temperature).
* Prompt log-probs ignore temperature: they are at T=1, as our contract wants.

Packed rows: each document of a row (a run starting where ``position_ids == 0``) is sent as its own
prompt, so no token sees the previous document, as in the direct teacher. (A document continued
from the previous row is scored from its first token in the row; RoPE attention depends only on
relative positions, so its absolute offset does not matter.) Positions with ``attention_mask == 0``
(padding at the end of the last row) are not sent: they get a finite placeholder (ids ``0..k-1``,
log-prob ``log(1/V)``) that the loss masks out through ``labels == -100``.

Server settings this client needs (checked against a real vLLM 0.32 CPU server, ``make test-vllm``):

* ``--max-logprobs K`` or more: vLLM refuses ``prompt_logprobs`` above it (20 unless raised).
* ``--max-model-len`` above the longest document, i.e. at least ``max_seq_length + 1``: the one
  generated token counts against the context, and a prompt of exactly ``max_model_len`` tokens is
  refused (``400 max_tokens must be at least 1, got 0``). When the model name is read from
  ``GET /v1/models``, so is its ``max_model_len``, and longer documents are refused before any request.
  vLLM itself refuses a ``--max-model-len`` above the model's ``max_position_embeddings``.
* On the CPU backend, a head_dim in {32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}: other sizes
  start a server that fails at the first request ("Unsupported CPU attention configuration").
* Prefix caching (on by default) is harmless: vLLM computes every prompt position of a request
  that asks for ``prompt_logprobs`` (measured: the same prompt, and a prompt sharing a 64- or
  100-token prefix with an earlier one, gave bit-identical log-probs).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from distill_dag.loss.topk import TeacherError, TeacherTopK
from distill_dag.teacher.providers.network import ServerTeacher


def _token_id(key: str) -> int:
    return int(key.split(":", 1)[1]) if key.startswith("token_id:") else int(key)


def _topk_of(entries: dict[str, Any], k: int) -> tuple[list[int], list[float]]:
    """{id-as-str: {"logprob": x, ...} or x} -> the k largest by log-prob, sorted descending."""
    items = [(_token_id(key), float(v["logprob"] if isinstance(v, dict) else v)) for key, v in entries.items()]
    items.sort(key=lambda it: -it[1])
    if len(items) < k:
        raise ValueError(f"{len(items)} log-probs for a position, fewer than k={k} (server's --max-logprobs too low?)")
    items = items[:k]
    return [i for i, _ in items], [lp for _, lp in items]


def parse_completion(choice: dict[str, Any], n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One ``choices[i]`` for a prompt of ``n`` tokens -> (ids [n, k] int64, logprobs [n, k] float32).

    Row ``t`` is the distribution of the token after prompt position ``t`` (rows 0..n-2 from
    ``prompt_logprobs[1:]``, row n-1 from the generated token's ``top_logprobs[0]``).
    """
    pl = choice.get("prompt_logprobs")
    if not isinstance(pl, list) or len(pl) != n:
        raise ValueError(f"prompt_logprobs has {len(pl) if isinstance(pl, list) else 'no'} items for a prompt of {n}")
    ids = np.zeros((n, k), dtype=np.int64)
    lps = np.zeros((n, k), dtype=np.float32)
    for t in range(n - 1):
        ids[t], lps[t] = _topk_of(pl[t + 1], k)
    top = ((choice.get("logprobs") or {}).get("top_logprobs") or [None])[0]
    if not top:
        raise ValueError("the completion carries no top_logprobs for the last prompt position")
    ids[n - 1], lps[n - 1] = _topk_of(top, k)
    return ids, lps


def segments(position_ids: np.ndarray | None, n_valid: int) -> list[tuple[int, int]]:
    """[start, end) of each document in a row's first ``n_valid`` positions (starts where position_ids == 0)."""
    if n_valid <= 0:
        return []
    if position_ids is None:
        return [(0, n_valid)]
    starts = [0] + [t for t in range(1, n_valid) if position_ids[t] == 0]
    return list(zip(starts, starts[1:] + [n_valid]))


class VLLMTeacher(ServerTeacher):
    """Provider over a stock vLLM server (``/v1/completions`` with ``prompt_logprobs``).

    ``vocab_size``: vLLM does not report it; pass the teacher's (the factory reads it from the
    model's config). ``None`` makes ``vocab_size`` unknown (0) and only ids are range-checked later.
    ``max_model_len``: the server's context; read from ``GET /v1/models`` when ``model`` is None, else
    unknown unless given (then an over-long document is refused by the server, with the same hint).
    The connection arguments, first and in order: :class:`ServerTeacher`'s.
    """

    def __init__(
        self,
        *args: Any,
        model: str | None = None,
        vocab_size: int | None = None,
        max_model_len: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.vocab_size = int(vocab_size or 0)
        self.max_model_len = int(max_model_len) if max_model_len else None
        if model is None:
            models = self.http.request("GET", "/v1/models", lambda r: r.json()["data"])
            if not models:
                raise TeacherError(f"vLLM server {self.url} serves no model (GET /v1/models is empty)")
            model = models[0]["id"]
            if self.max_model_len is None and models[0].get("max_model_len"):
                self.max_model_len = int(models[0]["max_model_len"])
        self.model = model

    def _complete(self, prompts: list[list[int]]) -> list[dict[str, Any]]:
        body = {
            "model": self.model,
            "prompt": prompts,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": self.k,
            "logprobs": self.k,
            "return_tokens_as_token_ids": True,
        }

        def parse(r: Any) -> list[dict[str, Any]]:
            choices = sorted(r.json()["choices"], key=lambda c: c["index"])
            if len(choices) != len(prompts):
                raise ValueError(f"{len(choices)} choices for {len(prompts)} prompts")
            return choices

        try:
            return self.http.request("POST", "/v1/completions", parse, json=body)
        except TeacherError as err:
            if "max_tokens" in str(err) or "context length" in str(err):
                raise TeacherError(f"{err} -- the longest prompt here has {max(map(len, prompts))} tokens and vLLM needs "
                                   "room for one generated token: restart vLLM with --max-model-len >= max_seq_length + 1") from None
            raise

    def topk(self, batch: dict[str, torch.Tensor]) -> TeacherTopK:
        ids = batch["input_ids"].cpu().numpy()
        B, T = ids.shape
        pos = batch["position_ids"].cpu().numpy() if "position_ids" in batch else None
        am = batch["attention_mask"].cpu().numpy() if "attention_mask" in batch else np.ones_like(ids)
        out_i = np.tile(np.arange(self.k, dtype=np.int64), (B, T, 1))
        out_l = np.full((B, T, self.k), -math.log(max(self.vocab_size, self.k)), dtype=np.float32)
        for a in range(0, B, self.batch_rows):
            where, prompts = [], []
            for b in range(a, min(a + self.batch_rows, B)):
                for s, e in segments(None if pos is None else pos[b], int(am[b].sum())):
                    where.append((b, s, e))
                    prompts.append(ids[b, s:e].tolist())
            if not prompts:
                continue
            longest = max(map(len, prompts))
            if self.max_model_len is not None and longest >= self.max_model_len:
                raise TeacherError(
                    f"vLLM server {self.url} serves {self.model!r} with max_model_len={self.max_model_len}, but a document "
                    f"of {longest} tokens needs {longest + 1} (prompt + the one generated token): restart vLLM with "
                    f"--max-model-len >= {longest + 1} (max_seq_length + 1)"
                )
            choices = self._complete(prompts)
            for (b, s, e), ch in zip(where, choices):
                try:
                    i, lp = parse_completion(ch, e - s, self.k)
                except (ValueError, KeyError, TypeError) as err:
                    raise TeacherError(f"vLLM server {self.url}: unreadable answer for row {b} tokens {s}..{e}: {err}") from None
                out_i[b, s:e], out_l[b, s:e] = i, lp
        if self.vocab_size and out_i.max(initial=0) >= self.vocab_size:
            raise TeacherError(f"vLLM server {self.url} returned token id {out_i.max()} >= vocab size {self.vocab_size}")
        return TeacherTopK(torch.from_numpy(out_i), torch.from_numpy(out_l))

    def identity(self) -> dict[str, Any]:
        return {"provider": "vllm", "url": self.url, "model": self.model}
