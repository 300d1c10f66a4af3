"""The seed's QUICKSTART walked through with ``distill``, as one of its users would (issue 31).

A seed project is laid out in a temporary folder (``data/distillation/`` raw JSONL with chat rows in
``messages`` and ShareGPT ``conversations`` form plus plain text, ``models/teacher/``: a tiny
``LlamaForCausalLM`` with a Llama-3-style tokenizer and chat template standing in for
Llama-3.2-1B-Instruct, ``configs/train_direct.yaml``: a flat seed config), and every step runs through
the real CLI in its own process, from the project root, with no edit between steps:

  download --dry-run -> tokenizer -> preprocess -> migrate-config -> finetune-teacher -> train (CE only)
  -> train (KD, --resume-from runs/direct_mode/checkpoint_latest.pt) -> eval -> cache_teacher_logits ->
  train (cached) -> serve-teacher + train (network, DISTILL_TEACHER_URL) -> trust_remote_code load

Each step's wall time is printed and the whole is checked: chat rows packed in the teacher's template,
the CE -> KD transition, the eval report beside the checkpoint, the cache used, the network teacher
reached through the env var, the student loading without ``distill_dag``.

    python bench/seed_walkthrough.py --quick     # ~2-3 min on 2 cores
    python bench/seed_walkthrough.py             # more rows and steps
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

if __package__:  # python -m bench.seed_walkthrough
    from bench._common import bench_parser
else:  # python bench/seed_walkthrough.py, from any folder: bench/ is sys.path[0]
    from _common import bench_parser

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISTILL_", "WANDB_"))}
    # offline as a user without the Hub; W&B off through wandb's own switch (honoured under wandb.mode auto)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def raw_rows(n: int, seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """Chat rows (messages, two turns), ShareGPT rows and text rows about small sums."""
    rng = random.Random(seed)
    msgs, sg, text = [], [], []
    for i in range(n):
        a, b, c = rng.randrange(5), rng.randrange(5), rng.randrange(5)  # sums stay within WORDS
        msgs.append({"id": f"m{i}", "messages": [
            {"role": "system", "content": "You answer sums in words."},
            {"role": "user", "content": f"What is {WORDS[a]} plus {WORDS[b]}?"},
            {"role": "assistant", "content": f"{WORDS[a]} plus {WORDS[b]} is {WORDS[a + b]}."},
            {"role": "user", "content": f"And plus {WORDS[c]}?"},
            {"role": "assistant", "content": f"Then it is {WORDS[a + b + c]}."}]})
        sg.append({"id": f"s{i}", "conversations": [
            {"from": "human", "value": f"Add {WORDS[a]} and {WORDS[c]}."},
            {"from": "gpt", "value": f"The sum is {WORDS[a + c]}."}]})
        text.append({"text": f"{WORDS[a]} plus {WORDS[b]} plus {WORDS[c]} makes {WORDS[a + b + c]}. " * 3})
    return msgs, sg, text


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_teacher(root: Path, texts: list[str]) -> Path:
    """models/teacher: a Llama-3-style tokenizer (special header tokens, chat template) + a tiny Llama."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # lazy: --help without transformers
    from transformers import PreTrainedTokenizerFast

    from distill_dag.teacher.model import build_tiny_teacher

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                  pad_token="<|end_of_text|>")
    tok.chat_template = LLAMA3
    out = root / "models" / "teacher"
    tok.save_pretrained(out)
    build_tiny_teacher(len(tok), {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "num_key_value_heads": 2}).save_pretrained(out)
    return out


def seed_config(quick: bool) -> str:
    """The seed's configs/train_direct.yaml, in its flat style."""
    return f"""\
model_variant: "tiny"
teacher_mode: "direct"
teacher_model: "models/teacher"
teacher_topk: 8
teacher_temperature: 2.0
distill_alpha: 0.2
max_seq_length: 64
physical_batch_size: 4
gradient_accumulation_steps: 1
learning_rate: 1.0e-3
max_steps: {2 if quick else 20}
train_data_path: "data/distillation_preprocessed"
val_data_path: "data/distillation_preprocessed"
num_workers: 0
use_pretokenized_data: true
cache_logits: false
cache_dir: "data/teacher_cache"
output_dir: "runs/direct_mode"
save_interval: 1
eval_interval: 0
log_interval: 1
device: "cpu"
"""


class Walk:
    def __init__(self, root: Path):
        self.root, self.times, self.logs = root, {}, root / "logs"
        self.logs.mkdir()

    def distill(self, name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 600) -> str:
        print(f"$ distill {' '.join(args)}", flush=True)
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "distill_dag.cli", *args], cwd=self.root, env=env or _env(),
                           capture_output=True, text=True, timeout=timeout)
        self.times[name] = time.perf_counter() - t0
        out = p.stdout + p.stderr
        (self.logs / f"{name}.log").write_text(out)
        if p.returncode != 0:
            raise SystemExit(f"step {name} failed (rc {p.returncode}):\n{out[-4000:]}")
        print(f"  ok in {self.times[name]:.1f} s", flush=True)
        return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def walk(root: Path, quick: bool) -> dict[str, float]:
    w = Walk(root)
    n = 60 if quick else 400
    msgs, sg, text = raw_rows(n)
    write_jsonl(root / "data" / "distillation" / "instruction_chat" / "ultrachat.jsonl", msgs)
    write_jsonl(root / "data" / "distillation" / "instruction_chat" / "openhermes.jsonl", sg)
    write_jsonl(root / "data" / "distillation" / "math_reasoning" / "sums.jsonl", text)
    corpus = [m["content"] for r in msgs for m in r["messages"]] + [r["text"] for r in text]
    teacher = build_teacher(root, corpus)
    (root / "configs").mkdir()
    (root / "configs" / "train_direct.yaml").write_text(seed_config(quick))
    steps = "2" if quick else "20"

    # 2. the download plan (no network: the plan only)
    out = w.distill("download_dry_run", "download", "--category", "instruction_chat", "--dry-run")
    assert "plan" in out, out
    # the teacher's tokenizer, saved where every stage finds it
    w.distill("tokenizer", "tokenizer", "--name", str(teacher.relative_to(root)), "--output", "data/tokenizer")
    # 3. tokenize & pack, the seed's flags
    w.distill("preprocess", "preprocess", "--input", "data/distillation", "--output", "data/distillation_preprocessed",
              "--recursive", "--skip-existing", "--max-seq-length", "64", "--tokenizer", "data/tokenizer")
    m = json.loads((root / "data" / "distillation_preprocessed" / "manifest.json").read_text())
    assert m["chat_template"] == "tokenizer" and m["totals"]["chat_docs"] == 2 * n, m["totals"]
    # 4. the seed's config, converted, next to the old one
    w.distill("migrate", "migrate-config", "configs/train_direct.yaml", "-o", "configs/new.yaml")
    cfg = "configs/new.yaml"
    # 5. finetune the teacher (LoRA)
    w.distill("finetune_teacher", "finetune-teacher", "--config", cfg, "--max-steps", steps, "--eval-interval", "0")
    # 6b. CE pretraining, then 6. KD resumed from the seed's checkpoint file
    w.distill("train_ce", "train", "--config", cfg, "--pretrain-ce-only")
    out = w.distill("train_kd", "train", "--config", cfg, "--resume-from", "runs/direct_mode/checkpoint_latest.pt",
                    "--max-steps", str(2 * int(steps)))
    assert "transition_ce_to_kd" in out and "[event" in out and "teacher" in out, out[-2000:]
    # 7. eval: the report beside the checkpoint
    w.distill("eval", "eval", "--config", cfg, "--checkpoint", "runs/direct_mode/final", "--no-niah",
              "--max-batches", "2", "--lm-eval-tasks", "")
    assert (root / "runs" / "direct_mode" / "eval").is_dir()
    # cache the teacher's logits with the seed's script name and flags, then train from the cache
    w.distill("cache", "cache_teacher_logits", "--config", cfg, "--data-path", "data/distillation_preprocessed",
              "--output-dir", "data/teacher_cache")
    w.distill("train_cached", "train", "--config", cfg, "--teacher-mode", "cached", "--output-dir", "runs/cached")
    # serve the teacher, train against it through DISTILL_TEACHER_URL (teacher.url points elsewhere)
    port = _free_port()
    log = (root / "logs" / "serve_teacher.log").open("w")
    t0 = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "distill_dag.cli", "serve-teacher", "--config", cfg,
                               "--port", str(port), "--device", "cpu"], cwd=root, env=_env(), stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(240):
            if server.poll() is not None:
                raise SystemExit(f"serve-teacher exited rc={server.returncode}: "
                                 f"{(root / 'logs' / 'serve_teacher.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        w.times["serve_teacher_up"] = time.perf_counter() - t0
        env = {**_env(), "DISTILL_TEACHER_URL": f"http://127.0.0.1:{port}"}
        w.distill("train_network", "train", "--config", cfg, "--teacher-mode", "network", "--output-dir",
                  "runs/network", env=env)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    # the student loads with transformers alone (trust_remote_code), outside this checkout
    t0 = time.perf_counter()
    code = ("import sys, torch; from transformers import AutoModelForCausalLM; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True); "
            "assert 'distill_dag' not in sys.modules, 'loaded through our package'; "
            "print(type(m).__name__, m(torch.tensor([[1, 2, 3]])).logits.shape)")
    env = {k: v for k, v in _env().items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-I", "-c", code, str(root / "runs" / "direct_mode" / "final")],
                       cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True, timeout=300)
    w.times["trust_remote_code_load"] = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"trust_remote_code load failed:\n{p.stdout}{p.stderr[-3000:]}")
    print(f"  {p.stdout.strip()}")
    return w.times


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__.splitlines()[0], quick="60 conversations, 2 steps per stage")
    ap.add_argument("--keep", default=None, metavar="DIR", help="walk in DIR (kept) instead of a temp folder")
    a = ap.parse_args(argv)
    root = Path(a.keep).resolve() if a.keep else Path(tempfile.mkdtemp(prefix="seed_walk_"))
    if a.keep and root.exists() and any(root.iterdir()):
        raise SystemExit(f"--keep {root}: give a new or empty folder")
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        times = walk(root, a.quick)
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    total = time.perf_counter() - t0
    print("\nstep                      seconds")
    for k, v in times.items():
        print(f"  {k:<24}{v:>8.1f}")
    print(f"  {'total':<24}{total:>8.1f}")
    print(json.dumps({"seed_walkthrough_s": round(total, 1), "steps": {k: round(v, 1) for k, v in times.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
