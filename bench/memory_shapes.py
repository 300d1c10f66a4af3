"""Real shapes on the CPU: a Llama-3.2-1B-shaped teacher, vocabulary 128256, the 350M / 500M RetNet
students, through the real CLI (``distill preprocess``, ``cache-logits``, ``serve-teacher``, ``train``).

What it builds in ``--workdir`` (default: a temp dir, removed unless ``--keep``):

- corpus: this Python's standard library (``.py`` files) as JSONL, just enough text for the rows the
  runs read;
- tokenizer: a byte-level BPE trained on that text (project's ``train_bpe``), its vocabulary padded to
  128256 with ``<|reserved_i|>`` entries that no merge produces (Llama 3 also ships reserved ids): the
  ids are real where the text is, and every tensor has the real vocabulary width;
- teacher: a random-init ``LlamaForCausalLM`` with Llama-3.2-1B's exact config (:data:`LLAMA_3_2_1B`),
  saved in bf16 and run in bf16 on the CPU (``teacher.dtype: bfloat16``: 2.5 GB instead of 5);
- one YAML config per run (the config-file route of the CLI; no flags beyond ``--config``).

Then per student: ``distill train`` in direct mode, ``distill cache-logits`` (k = 512) + ``distill
train`` in cached mode, and ``distill serve-teacher`` + ``distill train`` in network mode, each in its
own process: peak RSS (``wait4``'s ``ru_maxrss`` of that process) and seconds per step (from the run's
``metrics.jsonl``, ``log_interval: 1``). Beside them, in this process, the same builders measured part
by part (``--no-parts`` skips it): teacher weights and forward, student parameters, gradients, optimizer
states (after one step), activations (bytes autograd saves for the backward, from
``saved_tensors_hooks``) and the chunked loss (the gradients it produces in its forward + its peak),
each as exact tensor bytes and as the RSS peak over the phase. A projection from those parts says which
(seq, batch) fits the machine's memory in direct mode.

    nice -n 10 python bench/memory_shapes.py                      # full size: ~40 min on 2 cores
    python bench/memory_shapes.py --quick                         # the same code path at tiny shapes
    python bench/memory_shapes.py --students 350M --modes direct --seq 1024 --gradient-checkpointing

Its GPU counterpart, the trainer's tokens/s at these shapes, is bench/gpu_throughput.py. The full size runs in
no test (tests/bench/test_memory_shapes.py runs ``--quick``, and the full size with ``REAL_SHAPES_FULL=1``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:  # annotations only: the imports themselves are in the functions (--help without torch)
    import torch

if __package__:  # python -m bench.memory_shapes
    from bench._common import LLAMA_3_2_1B, LLAMA_TINY, ROOT, GiB, add_json, bench_parser, write_json
else:  # python bench/memory_shapes.py, from any folder: bench/ is sys.path[0]
    from _common import LLAMA_3_2_1B, LLAMA_TINY, ROOT, GiB, add_json, bench_parser, write_json

MACHINE_GIB = 24.0  # the development machine (free -g: 23 GiB usable)


# ---------------------------------------------------------------------------------------------
# memory probes
# ---------------------------------------------------------------------------------------------
def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim() -> None:
    """Free what can be freed (Python garbage, glibc's free lists) so the next phase starts clean."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Peak:
    """The RSS peak over a ``with`` block, sampled every 2 ms by a thread (torch ops release the GIL).
    ``.start`` (RSS when entered), ``.peak``, ``.end``; ``.rise`` = peak - start."""

    def __enter__(self) -> "Peak":
        trim()
        self.start = self.peak = rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self.end = rss()
        self.peak = max(self.peak, self.end)

    @property
    def rise(self) -> int:
        return self.peak - self.start


def tensor_bytes(ts: Any) -> int:
    seen, n = set(), 0
    for t in ts:
        if t is None:
            continue
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            n += t.untyped_storage().nbytes()
    return n


@contextlib.contextmanager
def saved_bytes(exclude: set[int]):
    """Bytes of the distinct storages autograd saves for the backward inside the block (parameters,
    by storage pointer in ``exclude``, not counted). Yields a dict whose "bytes" is filled at exit."""
    import torch  # lazy: --help without torch

    found: dict[int, int] = {}
    out = {"bytes": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            found[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out
    out["bytes"] = sum(found.values())


# ---------------------------------------------------------------------------------------------
# set-up: corpus, tokenizer, teacher, configs
# ---------------------------------------------------------------------------------------------
def stdlib_texts():
    lib = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(lib.rglob("*.py")):
        if "test" in f.parts or "site-packages" in f.parts:
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):  # a few stdlib files are not UTF-8
            continue
        if len(text) > 2000:
            yield f.relative_to(lib).as_posix(), text


def build_tokenizer(out: Path, vocab: int, bpe_vocab: int, train_bytes: int) -> Any:
    """A byte-level BPE trained on stdlib text, padded to ``vocab`` with unreachable reserved tokens."""
    from tokenizers import Tokenizer  # lazy: --help without transformers
    from transformers import PreTrainedTokenizerFast

    from distill_dag.data.tokenizer import EOS_TOKEN, PAD_TOKEN, train_bpe

    texts, n = [], 0
    for _, t in stdlib_texts():
        texts.append(t)
        n += len(t)
        if n >= train_bytes:
            break
    bpe = train_bpe(iter(texts), bpe_vocab)
    spec = json.loads(bpe.to_str())
    table = spec["model"]["vocab"]
    n0 = len(table)
    if n0 > vocab:
        raise SystemExit(f"the BPE has {n0} tokens, more than the vocabulary {vocab}")
    for i in range(vocab - n0):
        table[f"<|reserved_{i}|>"] = n0 + i  # no merge makes them: never produced, like Llama 3's reserved ids
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token=EOS_TOKEN,
                                  pad_token=PAD_TOKEN, model_max_length=1 << 30)
    assert len(tok) == vocab, (len(tok), vocab)
    tok.save_pretrained(str(out))
    return tok, n0


def write_corpus(raw: Path, tok: Any, tokens_needed: int) -> int:
    """Stdlib files as JSONL rows until their token count covers ``tokens_needed``."""
    raw.mkdir(parents=True, exist_ok=True)
    total = 0
    with open(raw / "stdlib.jsonl", "w") as f:
        for name, text in stdlib_texts():
            f.write(json.dumps({"id": name, "text": text}) + "\n")
            total += len(tok(text)["input_ids"]) + 1
            if total >= tokens_needed:
                break
    return total


def build_teacher(out: Path, arch: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    import torch  # lazy: --help without torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**arch)
    t0 = time.time()
    model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(out))
    info = {"parameters": n, "seconds": round(time.time() - t0, 1),
            "rope": dict(cfg.rope_parameters), "tied": bool(cfg.tie_word_embeddings)}
    del model
    trim()
    return info


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(a: argparse.Namespace, work: Path, student: str, mode: str, port: int) -> dict[str, Any]:
    """The whole config of one run (written as YAML; every path absolute)."""
    data = work / "data"
    return {
        "data": {"root": str(data), "tokenized_dir": str(data / "tokenized"), "sources": []},
        "tokenizer": {"name_or_path": str(data / "tokenizer")},
        "tokenize": {"max_seq_length": a.seq, "val_fraction": 0.0, "rows_per_shard": 4096},
        "teacher": {"model_name_or_path": str(work / "teacher"), "dtype": a.teacher_dtype,
                    "url": f"http://127.0.0.1:{port}", "serve_port": port, "batch_rows": a.batch,
                    "timeout_s": 3600.0},
        "teacher_ft": {"output_dir": str(work / "teacher_ft")},
        "logit_cache": {"k": a.k, "dir": str(work / "logit_cache"), "batch_rows": a.batch},
        "student": {"variant": student, "gradient_checkpointing": a.gradient_checkpointing},
        "train": {"teacher_mode": mode, "teacher_topk": a.k, "batch_size": a.batch, "grad_accum": 1,
                  "max_steps": a.steps, "warmup_steps": 0, "log_interval": 1, "eval_interval": 0,
                  "save_interval": 0, "device": "cpu", "loss_chunk_tokens": a.loss_chunk_tokens,
                  "output_dir": str(work / "runs" / f"{student}_{mode}")},
        "wandb": {"mode": "disabled"},
    }


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------
# the CLI, one process per stage
# ---------------------------------------------------------------------------------------------
def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "distill_dag.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _reap(p: subprocess.Popen, timeout: float | None) -> tuple[int, int]:
    """(exit code, peak RSS bytes of that process) via wait4; raises TimeoutError."""
    deadline = None if timeout is None else time.time() + timeout
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            p.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait for it again
            return p.returncode, ru.ru_maxrss * 1024
        if deadline is not None and time.time() > deadline:
            raise TimeoutError
        time.sleep(0.2)


def run_cli(args: list[str], log: Path, timeout: float) -> dict[str, Any]:
    print("  $ distill " + " ".join(args[3:]), flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=str(ROOT))
        try:
            rc, peak = _reap(p, timeout)
        except TimeoutError:
            p.kill()
            rc, peak = _reap(p, None)
            rc = 124
    out = {"rc": rc, "peak_rss": peak, "wall_s": time.time() - t0, "log": str(log)}
    if rc != 0:
        print(f"    FAILED rc={rc}; last lines of {log}:\n" + "\n".join(log.read_text().splitlines()[-25:]), flush=True)
    return out


@contextlib.contextmanager
def teacher_server(config: Path, port: int, log: Path, timeout: float):
    """``distill serve-teacher`` in its own process; yields a dict filled with its peak RSS at exit."""
    print(f"  $ distill serve-teacher --config {config} (port {port})", flush=True)
    info: dict[str, Any] = {}
    f = open(log, "w")
    p = subprocess.Popen(cli("serve-teacher", "--config", str(config), "--port", str(port), "--device", "cpu"),
                         stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=str(ROOT))
    t0 = time.time()
    try:
        while True:
            if p.poll() is not None:
                raise RuntimeError(f"serve-teacher exited rc={p.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() - t0 > timeout:
                raise TimeoutError(f"serve-teacher not up after {timeout:.0f} s (log {log})")
            time.sleep(1.0)
        info["startup_s"] = time.time() - t0
        yield info
    finally:
        if p.returncode is None:
            p.send_signal(signal.SIGINT)
            try:
                _, info["peak_rss"] = _reap(p, 30)
            except TimeoutError:
                p.kill()
                _, info["peak_rss"] = _reap(p, None)
        f.close()


def step_times(run_dir: Path) -> tuple[list[float], list[int]]:
    """Seconds and tokens of each train step (one metrics row per step: its tokens / its tokens/s). A
    packed dataset's last row is partial: a step that drew it has fewer tokens."""
    secs, toks, prev = [], [], 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("kind") == "train":
            toks.append(row["tokens"] - prev)
            secs.append(toks[-1] / max(row["tokens_per_s"], 1e-9))
            prev = row["tokens"]
    return secs, toks


def step_rss(run_dir: Path) -> float:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return max((r.get("rss_gb", 0.0) for r in rows if r.get("kind") == "train"), default=0.0)


# ---------------------------------------------------------------------------------------------
# parts, in this process, with the trainer's own builders
# ---------------------------------------------------------------------------------------------
def measure_parts(cfg_path: Path) -> dict[str, Any]:
    """Exact tensor bytes and RSS peaks of each part of one direct-mode step (see the module docstring)."""
    import torch  # lazy: --help without torch; all of them loaded before base_rss below

    from distill_dag.config import load_config
    from distill_dag.data.dataset import make_loader
    from distill_dag.loss.kd import distill_loss
    from distill_dag.model.variants import build_student
    from distill_dag.teacher.providers.direct import DirectTeacher
    from distill_dag.training.optim import build_optimizers

    cfg = load_config(str(cfg_path))
    tc = cfg.train
    torch.manual_seed(0)
    batch = next(iter(make_loader(cfg.tokenized_dir, "train", tc.batch_size, seed=0)))
    parts: dict[str, Any] = {"base_rss": rss()}

    with Peak() as p:
        teacher = DirectTeacher.from_config(cfg.teacher, tc.teacher_topk, "cpu")
        with torch.no_grad():  # safetensors maps the file: fault every weight page in here, not in the forward
            for w in teacher.model.parameters():
                w.view(-1)[:: max(1, 4096 // w.element_size())].sum()
    parts["teacher_weights"] = {"bytes": tensor_bytes(teacher.model.parameters()), "rss": p.end - p.start}
    with Peak() as p:
        t0 = time.time()
        topk = teacher.topk(batch)
        parts["teacher_forward_s"] = time.time() - t0
    parts["teacher_forward"] = {"bytes": tensor_bytes([topk.indices, topk.logprobs]), "rss": p.rise}
    teacher.close()
    del teacher
    trim()

    with Peak() as p:
        model = build_student(cfg.student, int(cfg_vocab(cfg))).train()
    params = list(model.parameters())
    parts["student_params"] = {"bytes": tensor_bytes(params), "rss": p.end - p.start,
                               "count": sum(x.numel() for x in params)}
    exclude = {x.untyped_storage().data_ptr() for x in params}
    opt = build_optimizers(model, tc)
    W = model.get_output_embeddings().weight
    for it in range(1):  # one step: the optimizer allocates its states in it (measured by po)
        with Peak() as pa, saved_bytes(exclude) as sa:
            t0 = time.time()
            hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 position_ids=batch["position_ids"]).last_hidden_state
            t_fwd = time.time() - t0
        with Peak() as pl, saved_bytes(exclude) as sl:
            t0 = time.time()
            out = distill_loss(hidden, W, batch["labels"], topk, temperature=tc.temperature,
                               distill_alpha=tc.distill_alpha, tail=tc.tail, chunk_tokens=tc.loss_chunk_tokens)
            t_loss = time.time() - t0
        with Peak() as pb:
            t0 = time.time()
            out.loss.backward()
            t_bwd = time.time() - t0
        grads = tensor_bytes(x.grad for x in params)
        del hidden, out
        with Peak() as po:
            t0 = time.time()
            opt.step()
            t_opt = time.time() - t0
        opt.zero_grad(set_to_none=True)
    states = [v for o in opt for st in o.state.values() for v in st.values() if torch.is_tensor(v) and v.dim()]
    parts["optimizer_states"] = {"bytes": tensor_bytes(states), "rss": po.rise}
    parts["activations"] = {"bytes": sa["bytes"], "rss": pa.rise}
    parts["loss"] = {"bytes": sl["bytes"], "rss": pl.rise}
    parts["gradients"] = {"bytes": grads, "rss": pb.rise}
    parts["student_step_s"] = {"forward": t_fwd, "loss": t_loss, "backward": t_bwd, "optimizer": t_opt}
    parts["tokens"] = int(batch["input_ids"].numel())
    parts["peak_rss_self"] = max(pa.peak, pl.peak, pb.peak, po.peak)
    del model, opt, params, states, W
    trim()
    return parts


def cfg_vocab(cfg: Any) -> int:
    from distill_dag.data.manifest import Manifest  # lazy: --help without distill_dag

    return Manifest.load(cfg.tokenized_dir).vocab_size


def projection(parts: dict[str, Any], tokens: int, chunk: int) -> float:
    """Projected direct-mode peak (bytes) at ``tokens`` = batch x seq: fixed parts + the larger of the
    teacher forward and the student's forward/backward, activations and teacher forward scaled by tokens,
    the loss by min(tokens, chunk) for its logits chunk (its dW is fixed)."""
    n0 = parts["tokens"]
    s = tokens / n0
    b = lambda k: max(parts[k]["bytes"], parts[k]["rss"])  # noqa: E731
    fixed = parts["base_rss"] + b("teacher_weights") + b("student_params") + b("optimizer_states")
    loss = parts["loss"]["rss"] * min(tokens, chunk) / min(n0, chunk)
    g = parts["gradients"]  # the backward's own transient (recomputed blocks under checkpointing) grows with tokens
    student = b("activations") * s + loss + g["bytes"] + max(0, g["rss"] - g["bytes"]) * s
    # weight pages first touched by the forward (a mapped file) are weights, not forward memory
    unmapped = max(0, parts["teacher_weights"]["bytes"] - parts["teacher_weights"]["rss"])
    teacher_fwd = max(0, parts["teacher_forward"]["rss"] - unmapped) * s
    return fixed + max(teacher_fwd, student)


# ---------------------------------------------------------------------------------------------
def main() -> int:
    ap = bench_parser(__doc__.splitlines()[0], quick="tiny shapes, same code path (seconds per stage)")
    ap.add_argument("--students", default=None, help="comma list (default 350M,500M; --quick: tiny)")
    ap.add_argument("--modes", default="direct,cached,network", help="comma list, or none (only the parts)")
    ap.add_argument("--seq", type=int, default=None, help="row length (default 512; --quick 64)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="train steps per run (the first one warms up; "
                                                             "default 3, --quick 2)")
    ap.add_argument("--k", type=int, default=512, help="teacher top-k (train.teacher_topk = logit_cache.k)")
    ap.add_argument("--teacher-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--gradient-checkpointing", action="store_true", help="student.gradient_checkpointing")
    ap.add_argument("--loss-chunk-tokens", type=int, default=1024, help="train.loss_chunk_tokens")
    ap.add_argument("--no-parts", action="store_true", help="skip the in-process memory breakdown")
    ap.add_argument("--workdir", default=None, help="default: a temp dir (removed unless --keep)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per CLI stage")
    add_json(ap, help="write every number here")
    a = ap.parse_args()
    a.seq = a.seq or (64 if a.quick else 512)
    a.steps = a.steps or (2 if a.quick else 3)
    students = (a.students or ("tiny" if a.quick else "350M,500M")).split(",")
    modes = [] if a.modes == "none" else a.modes.split(",")  # none: only the parts
    arch = LLAMA_TINY if a.quick else LLAMA_3_2_1B
    vocab = arch["vocab_size"]

    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="real_shapes_"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    result: dict[str, Any] = {"argv": sys.argv[1:], "seq": a.seq, "batch": a.batch, "k": a.k, "vocab": vocab,
                              "teacher_dtype": a.teacher_dtype, "gradient_checkpointing": a.gradient_checkpointing,
                              "runs": {}, "parts": {}}
    t_all = time.time()
    try:
        # ---- set-up ------------------------------------------------------------------------
        data = work / "data"
        print(f"== set-up in {work}", flush=True)
        t0 = time.time()
        if (data / "tokenizer" / "tokenizer.json").exists() and (work / "setup.json").exists():
            # a kept --workdir: the same tokenizer and teacher again
            from transformers import AutoTokenizer  # lazy: --help without transformers

            tok, setup = AutoTokenizer.from_pretrained(str(data / "tokenizer")), json.loads((work / "setup.json").read_text())
            n_bpe = setup["bpe"]
        else:
            tok, n_bpe = build_tokenizer(data / "tokenizer", vocab, 512 if a.quick else 16384,
                                         50_000 if a.quick else 2_000_000)
            setup = None
        rows = max(2, a.steps * a.batch + 1)
        n_tok = write_corpus(data / "raw", tok, int((rows + 0.5) * a.seq))
        print(f"  tokenizer: BPE {n_bpe} tokens + {vocab - n_bpe} reserved = {vocab}; corpus {n_tok:,} tokens "
              f"({time.time() - t0:.1f} s)", flush=True)
        t0 = time.time()
        result["teacher"] = setup["teacher"] if setup else build_teacher(work / "teacher", arch)
        (work / "setup.json").write_text(json.dumps({"bpe": n_bpe, "teacher": result["teacher"]}))
        print(f"  teacher: LlamaForCausalLM {result['teacher']['parameters'] / 1e6:.1f}M params, rope "
              f"{result['teacher']['rope']['rope_type']}, tied={result['teacher']['tied']}, saved bf16 "
              f"({time.time() - t0:.1f} s)", flush=True)
        port = free_port()
        base_cfg = write_config(work / "preprocess.yaml", run_config(a, work, students[0], "direct", port))
        r = run_cli(cli("preprocess", "--config", str(base_cfg), "--input", str(data / "raw"),
                        "--output", str(data / "tokenized"), "--tokenizer", str(data / "tokenizer"),
                        "--max-seq-length", str(a.seq)), work / "logs" / "preprocess.log", a.timeout)
        result["preprocess"] = r
        if r["rc"]:
            return 1

        # ---- the CLI runs ------------------------------------------------------------------
        for student in students:
            for mode in modes:
                print(f"== {student} {mode}", flush=True)
                cfg_path = write_config(work / f"{student}_{mode}.yaml", run_config(a, work, student, mode, port))
                run: dict[str, Any] = {}
                if mode == "cached" and "cache_logits" not in result:
                    result["cache_logits"] = run_cli(cli("cache-logits", "--config", str(cfg_path)),
                                                     work / "logs" / "cache_logits.log", a.timeout)
                    if result["cache_logits"]["rc"]:
                        return 1
                train_cmd = cli("train", "--config", str(cfg_path))
                shutil.rmtree(work / "runs" / f"{student}_{mode}", ignore_errors=True)  # metrics.jsonl appends
                if mode == "network":
                    with teacher_server(cfg_path, port, work / "logs" / f"serve_{student}.log", a.timeout) as srv:
                        run = run_cli(train_cmd, work / "logs" / f"train_{student}_{mode}.log", a.timeout)
                    run["server_peak_rss"] = srv.get("peak_rss", 0)
                    run["server_startup_s"] = srv.get("startup_s")
                else:
                    run = run_cli(train_cmd, work / "logs" / f"train_{student}_{mode}.log", a.timeout)
                if run["rc"]:
                    return 1
                run_dir = work / "runs" / f"{student}_{mode}"
                run["step_s"], run["step_tokens"] = step_times(run_dir)
                run["logged_rss_gb"] = step_rss(run_dir)
                result["runs"][f"{student}/{mode}"] = run
                st = run["step_s"]
                print(f"    peak RSS {run['peak_rss'] / GiB:.2f} GiB"
                      + (f" (+ server {run['server_peak_rss'] / GiB:.2f} GiB)" if mode == "network" else "")
                      + f"; s/step (tokens) {', '.join(f'{x:.1f} ({n})' for x, n in zip(st, run['step_tokens']))}; "
                      f"wall {run['wall_s']:.0f} s", flush=True)
            if not a.no_parts:
                print(f"== {student} parts (in process)", flush=True)
                result["parts"][student] = measure_parts(
                    write_config(work / f"{student}_parts.yaml", run_config(a, work, student, "direct", port)))
    finally:
        if a.json:
            write_json(a.json, result)
        if not a.keep and not a.workdir:
            shutil.rmtree(work, ignore_errors=True)

    report(result, students, modes, a)
    print(f"\ntotal {time.time() - t_all:.0f} s")
    return 0


def report(result: dict[str, Any], students: list[str], modes: list[str], a: argparse.Namespace) -> None:
    unit, scale = ("MiB", 2**20) if a.quick else ("GiB", GiB)
    g = lambda b: f"{b / scale:.2f}"  # noqa: E731
    print(f"\n## Real shapes: vocab {result['vocab']}, teacher {result['teacher']['parameters'] / 1e6:.0f}M "
          f"({result['teacher_dtype']} on the CPU), seq {result['seq']} x batch {result['batch']}, k {result['k']}, "
          f"gradient checkpointing {'on' if result['gradient_checkpointing'] else 'off'}")
    if "cache_logits" in result:
        c = result["cache_logits"]
        print(f"cache-logits (k={result['k']}): peak RSS {g(c['peak_rss'])} {unit}, wall {c['wall_s']:.0f} s")
    print(f"\n| student | mode | peak RSS trainer ({unit}) | peak RSS teacher server ({unit}) | s/step 1 (warm-up) | "
          f"s/step after (mean) | s per {result['seq'] * result['batch']} tokens after |")
    print("|---|---|---|---|---|---|---|")
    for s in students:
        for m in modes:
            r = result["runs"].get(f"{s}/{m}")
            if not r:
                continue
            st, nt = r["step_s"], r.get("step_tokens") or [result["seq"] * result["batch"]] * len(r["step_s"])
            rest = sum(st[1:]) / len(st[1:]) if len(st) > 1 else float("nan")
            per = sum(st[1:]) / max(sum(nt[1:]), 1) * result["seq"] * result["batch"] if len(st) > 1 else float("nan")
            srv = g(r["server_peak_rss"]) if m == "network" else "-"
            print(f"| {s} | {m} | {g(r['peak_rss'])} | {srv} | {st[0]:.1f} | {rest:.1f} | {per:.1f} |")
    for s, p in result["parts"].items():
        print(f"\nparts, {s}, one direct-mode step of {p['tokens']} tokens (in process; exact tensor bytes, and the "
              f"RSS the phase added at its peak):")
        print(f"| part | tensor {unit} | RSS rise {unit} |\n|---|---|---|")
        names = [("teacher_weights", "teacher weights"), ("teacher_forward", "teacher forward (top-k out / peak)"),
                 ("student_params", "student parameters"), ("gradients", "gradients (backward peak)"),
                 ("optimizer_states", "optimizer states"), ("activations", "activations (saved for backward)"),
                 ("loss", "chunked loss (dW, dh / peak)")]
        for key, name in names:
            print(f"| {name} | {g(p[key]['bytes'])} | {g(p[key]['rss'])} |")
        t = p["student_step_s"]
        print(f"timings: teacher forward {p['teacher_forward_s']:.1f} s; student forward {t['forward']:.1f} s, "
              f"loss {t['loss']:.1f} s, backward {t['backward']:.1f} s, optimizer {t['optimizer']:.1f} s; "
              f"process baseline {g(p['base_rss'])} {unit}")
        measured = result["runs"].get(f"{s}/direct", {}).get("peak_rss")
        proj = projection(p, p["tokens"], a.loss_chunk_tokens)
        print(f"projected direct-mode peak at the measured shape: {g(proj)} {unit}"
              + (f" (measured {g(measured)} {unit})" if measured else ""))
        shapes = [(512, 1), (1024, 1), (1024, 4), (2048, 4), (4096, 1), (4096, 4)]
        cells = [f"{T}x{B}: {g(projection(p, T * B, a.loss_chunk_tokens))}" for T, B in shapes]
        print(f"projected direct-mode peak {unit} (seq x batch; the machine has {MACHINE_GIB:.0f} GiB): " + ", ".join(cells))


if __name__ == "__main__":
    sys.exit(main())
