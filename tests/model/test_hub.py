"""The student's ``final`` folder as a Hugging Face Hub model: shipped self-contained code loaded by a fresh
interpreter that cannot import distill_dag (trust_remote_code, generation until EOS, same logits), special
token ids, the trained length on the tokenizer, the model card (training facts, losses, eval table), modes."""

from __future__ import annotations

import ast
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import stdlib_tokenizer

import distill_dag  # noqa: F401  (registers the Auto classes)
from distill_dag.training.checkpoint import write_final
from distill_dag.io import FILE_MODE, sha256_file
from distill_dag.model import model_card, shipped_code
from distill_dag.model.retnet import RetNetForCausalLM
from distill_dag.model.variants import student_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAINED_LEN = 32
PROMPT = "def main(args):"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """The project's byte-level BPE (EOS id 0, pad id 1) on a little stdlib text, and that text packed."""
    from distill_dag.data.pack import tokenize_to_parquet

    root = tmp_path_factory.mktemp("corpus")
    raw, tok, tok_hash = stdlib_tokenizer(root, vocab_size=300, max_bytes=60_000)
    tokenize_to_parquet(raw, root / "tokenized", tok, TRAINED_LEN, val_fraction=0.2, rows_per_shard=512,
                        tokenizer_hash=tok_hash)
    return {"root": root, "tokenizer": tok, "tokenized": root / "tokenized"}


@pytest.fixture(scope="module")
def tok_dir(corpus) -> Path:
    return corpus["tokenizer"]


def _tokenizer(tok_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def _eos_model(tok_dir: Path) -> tuple[RetNetForCausalLM, list[int], list[int]]:
    """A tiny student whose greedy continuation of PROMPT reaches EOS after a few tokens, and the ids of
    (prompt, continuation up to and including EOS).

    A random model rarely emits EOS, so: take its greedy continuation, pick a token t that first appears at
    step k >= 2 (and not in the prompt), and swap the embedding rows of t and EOS (tied head: the model is
    the same one with the two ids relabelled). Its greedy continuation is then the old one up to k, then EOS.
    """
    tok = _tokenizer(tok_dir)
    eos = tok.eos_token_id
    prompt = tok(PROMPT)["input_ids"]
    for seed in range(50):
        torch.manual_seed(seed)
        cfg = student_config("tiny", len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, chunk_size=8, initializer_range=0.5)
        model = RetNetForCausalLM(cfg).eval()
        x = torch.tensor([prompt])
        with torch.no_grad():
            new = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=12,
                                 do_sample=False, eos_token_id=None, pad_token_id=eos)[0, len(prompt):].tolist()
        for k in range(2, len(new)):
            t = new[k]
            if t != eos and eos not in new[:k] and t not in new[:k] and t not in prompt and eos not in prompt:
                with torch.no_grad():
                    w = model.model.embed_tokens.weight
                    w[[eos, t]] = w[[t, eos]].clone()
                assert model.lm_head.weight is w
                return model, prompt, new[:k] + [eos]
    raise AssertionError("no seed gives a continuation with a fresh token after step 2")


def _fake_checkpoint(root: Path, model: RetNetForCausalLM, tok_dir: Path) -> Path:
    """What save_checkpoint leaves: save_pretrained + tokenizer files + run.json (trainer_state is skipped)."""
    ckpt = root / "run" / "checkpoints" / "step-0000004"
    model.save_pretrained(ckpt)
    for f in tok_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, ckpt / f.name)
    run = {"step": 4, "tokens": 4096, "pretrain_ce_only": False,
           "lineage": {"manifest_hash": "ab" * 32, "tokenizer_hash": "cd" * 32, "config_hash": "ef" * 32,
                       "teacher_mode": "direct",
                       "teacher": {"provider": "direct", "model": "meta-llama/Llama-3.2-1B", "weights_sha256": "12" * 32}},
           "config": {"tokenize": {"max_seq_length": TRAINED_LEN},
                      "student": {"variant": "tiny", "overrides": {"hidden_size": 32}},
                      "train": {"temperature": 2.0, "distill_alpha": 0.5, "teacher_topk": 16}}}
    (ckpt / "run.json").write_text(json.dumps(run))
    (ckpt / "trainer_state.pt").write_bytes(b"not copied")
    return ckpt


@pytest.fixture(scope="module")
def final(tmp_path_factory, tok_dir) -> dict:
    root = tmp_path_factory.mktemp("hub")
    model, prompt, expected = _eos_model(tok_dir)
    ckpt = _fake_checkpoint(root, model, tok_dir)
    return {"dir": write_final(root / "run", ckpt), "ckpt": ckpt, "prompt": prompt, "expected": expected,
            "root": root}


# ---- the fresh interpreter ---------------------------------------------------------------------------
FRESH = r'''
import importlib.abc, json, sys


class NoDistillDag(importlib.abc.MetaPathFinder):
    """distill_dag is installed (editable) in this venv: make sure the shipped code never reaches it."""

    def find_spec(self, name, path=None, target=None):
        if name == "distill_dag" or name.startswith("distill_dag."):
            raise ImportError(f"the shipped checkpoint code imported {name}")


sys.meta_path.insert(0, NoDistillDag())
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, batch_file, out_file = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
batch = torch.load(batch_file)
with torch.no_grad():
    logits = model(**batch).logits
    x = tok(sys.argv[4], return_tensors="pt")
    gen = model.generate(**x, max_new_tokens=40, do_sample=False)
torch.save(logits, out_file)
print(json.dumps({
    "class": type(model).__module__ + "." + type(model).__name__,
    "generated": gen[0].tolist(),
    "eos": model.generation_config.eos_token_id,
    "pad": model.generation_config.pad_token_id,
    "config_eos": model.config.eos_token_id,
    "model_max_length": tok.model_max_length,
    "distill_modules": sorted(m for m in sys.modules if m == "distill_dag" or m.startswith("distill_dag.")),
    "sys_path_has_repo": any(p and ("/work/main" == p.rstrip("/") or p.endswith("/tests")) for p in sys.path),
}))
'''


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    """Two rows, a document boundary inside row 0, padding at the end of row 1."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, vocab, (2, 20), generator=g)
    pos = torch.stack([torch.cat([torch.arange(11), torch.arange(9)]), torch.arange(20)])
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, -4:] = 0
    return {"input_ids": ids, "position_ids": pos, "attention_mask": mask}


def test_fresh_interpreter_loads_with_trust_remote_code_and_stops_at_eos(final, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = final["dir"]
    ours = AutoModelForCausalLM.from_pretrained(str(folder)).eval()  # in-package: distill_dag's classes
    assert type(ours) is RetNetForCausalLM
    batch = _batch(ours.config.vocab_size)
    with torch.no_grad():
        ref = ours(**batch).logits
    torch.save(batch, tmp_path / "batch.pt")
    (tmp_path / "fresh.py").write_text(FRESH)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # -I: no PYTHONPATH, no user site, no script/cwd dir on sys.path; cwd outside the checkout
    proc = subprocess.run([sys.executable, "-I", str(tmp_path / "fresh.py"), str(folder), str(tmp_path / "batch.pt"),
                           str(tmp_path / "logits.pt"), PROMPT], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["distill_modules"] == [] and not out["sys_path_has_repo"]
    assert out["class"].startswith("transformers_modules.") and out["class"].endswith("modeling_retnet.RetNetForCausalLM")
    assert out["eos"] == out["config_eos"] == 0 and out["pad"] == 1
    assert out["model_max_length"] == TRAINED_LEN
    # greedy generation ends at EOS, long before max_new_tokens
    assert out["generated"] == final["prompt"] + final["expected"]
    assert len(final["expected"]) < 40
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), ref, rtol=0, atol=1e-6)


def test_in_package_generate_stops_at_eos(final):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = final["dir"]
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    with torch.no_grad():
        gen = model.generate(**tok(PROMPT, return_tensors="pt"), max_new_tokens=40, do_sample=False)
    assert gen[0].tolist() == final["prompt"] + final["expected"]


# ---- the folder's files ------------------------------------------------------------------------------
def test_config_generation_config_and_tokenizer(final, tok_dir):
    folder = final["dir"]
    tok = _tokenizer(tok_dir)
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["eos_token_id"], cfg["pad_token_id"], cfg["bos_token_id"]) == (tok.eos_token_id, tok.pad_token_id, None)
    assert cfg["eos_token_id"] is not None and cfg["pad_token_id"] is not None
    assert cfg["auto_map"] == shipped_code.AUTO_MAP
    for ref in cfg["auto_map"].values():
        module, cls = ref.split(".")
        assert f"class {cls}(" in (folder / f"{module}.py").read_text()
    gen = json.loads((folder / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["pad_token_id"]) == (tok.eos_token_id, tok.pad_token_id)
    assert "bos_token_id" not in gen  # the tokenizer has none
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == TRAINED_LEN
    # the tokenizer's vocabulary itself is untouched (its hash stays the data's)
    assert sha256_file(folder / "tokenizer.json") == sha256_file(tok_dir / "tokenizer.json")
    assert not (folder / "trainer_state.pt").exists()


def test_file_modes_follow_the_umask(final):
    for folder in (final["ckpt"], final["dir"]):
        for f in folder.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == FILE_MODE, f"{f} is {oct(f.stat().st_mode)}"


def test_checksums_cover_the_folder_but_the_card(final):
    folder = final["dir"]
    sums = json.loads((folder / "checksums.json").read_text())
    assert {p.name for p in folder.iterdir()} - set(sums) == {"checksums.json", "README.md", "model_card.json",
                                                              "source.json"}
    for name, digest in sums.items():
        assert sha256_file(folder / name) == digest, name


def test_model_card_front_matter_and_facts(final):
    card = (final["dir"] / "README.md").read_text()
    assert card.startswith("---\n")
    front = card.split("---\n")[1]
    for line in ("library_name: transformers", "pipeline_tag: text-generation", "- retnet", "- custom_code"):
        assert line in front.splitlines()
    assert "license: other  # PLACEHOLDER" in front
    assert "License: placeholder" in card
    assert "`meta-llama/Llama-3.2-1B`" in card  # the teacher
    assert "ab" * 32 in card  # the data manifest hash
    assert "| training tokens | 4,096 |" in card
    assert f"| {TRAINED_LEN} |" in card
    assert "## Intended use" in card
    assert "trust_remote_code=True" in card
    assert "Not evaluated yet" in card and "Not recorded yet" in card
    params = sum(p.numel() for p in RetNetForCausalLM.from_pretrained(str(final["dir"])).parameters())
    assert f"A {params:,}-parameter RetNet" in card


def test_card_sections_filled_in_later(final, tmp_path):
    folder = tmp_path / "final"
    shutil.copytree(final["dir"], folder)
    model_card.update_model_card(folder, training={"tokens": 8192, "steps": 8,
                                            "losses": {"held-out loss (nats/token)": 3.25}})
    rows = [{"model": "student", "nats_per_token": 3.2, "bits_per_token": 4.6, "ppl": 24.5, "tokens": 900},
            {"model": "CE-only baseline", "nats_per_token": 3.5, "bits_per_token": 5.0, "ppl": 33.1, "tokens": 900}]
    assert model_card.add_eval_to_model_card(folder, {"split": "val", "perplexity_rows": rows, "niah_accuracy": 0.5,
                                               "niah_table": "| depth | 256 |\n|---|---|\n| 0.1 | 0.50 |"}) is not None
    card = (folder / "README.md").read_text()
    assert "| held-out loss (nats/token) | 3.2500 |" in card and "| training tokens | 8,192 |" in card
    assert "| student | 3.2000 | 4.6000 | 24.500 | 900 |" in card
    assert "| CE-only baseline | 3.5000 |" in card
    assert "accuracy 0.50" in card and "| 0.1 | 0.50 |" in card
    assert "Not evaluated yet" not in card and "Not recorded yet" not in card
    assert "ab" * 32 in card  # earlier facts kept
    # a folder without a card (a step checkpoint) is left alone
    assert model_card.add_eval_to_model_card(final["ckpt"], {"perplexity_rows": rows}) is None
    assert not (final["ckpt"] / "README.md").exists()


def test_evaluate_run_fills_in_the_card(final, corpus, tmp_path):
    from distill_dag.config import config_from_dict
    from distill_dag.eval.report import evaluate_run

    shutil.copytree(final["dir"], tmp_path / "run" / "final")
    cfg = config_from_dict({
        "data": {"root": str(corpus["root"])}, "tokenize": {"max_seq_length": TRAINED_LEN},
        "teacher": {"model_name_or_path": None}, "teacher_ft": {"output_dir": str(tmp_path / "teacher_ft")},
        "train": {"device": "cpu", "output_dir": str(tmp_path / "run")},
        "eval": {"max_batches": 1, "batch_size": 4, "niah": False, "sample_prompts": 1, "sample_prompt_tokens": 8,
                 "max_new_tokens": 4},
    })
    result = evaluate_run(cfg, log=lambda *_: None)
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "Not evaluated yet" not in card
    assert f"| student | {result['student_nats_per_token']:.4f} |" in card
    assert json.loads((tmp_path / "run" / "final" / "model_card.json").read_text())["evaluation"]["split"] == "val"


# ---- the shipped code --------------------------------------------------------------------------------
def test_shipped_code_imports_no_distill_dag_and_requires_only_torch_transformers(final):
    from transformers.dynamic_module_utils import get_imports, get_relative_import_files

    folder = final["dir"]
    names = {f"{n}.py" for n in shipped_code.SHIPPED_MODULES.values()}
    assert names <= {p.name for p in folder.iterdir()}
    for name in names:
        tree = ast.parse((folder / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "distill_dag" for a in node.names), name
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] != "distill_dag", name
        # what transformers' check_imports demands, for this file and (Hub loading) each relative import
        assert set(get_imports(folder / name)) - set(sys.stdlib_module_names) - {"__future__"} <= \
            {"torch", "transformers", "huggingface_hub"}, name
    # everything modeling_retnet.py reaches is in the folder (transformers copies exactly these)
    reached = {Path(p).name for p in get_relative_import_files(str(folder / "modeling_retnet.py"))}
    assert reached == names - {"modeling_retnet.py"}


def test_rewrite_refuses_what_it_cannot_ship_and_keeps_optional_imports_optional():
    with pytest.raises(shipped_code.ShippedCodeError, match=r"distill_dag\.io.*does not ship"):
        shipped_code._rewrite("from distill_dag.io import sha256_file\n", "m")
    with pytest.raises(shipped_code.ShippedCodeError, match="relative import"):
        shipped_code._rewrite("from .x import y\n", "m")
    src = ("import torch\n"
           "from distill_dag.kernels.retention.chunk import (\n    retention_chunkwise,\n)\n"
           "def f():\n    import triton_missing_pkg.language as tl\n    return tl\n")
    out = shipped_code._rewrite(src, "m")
    assert "from .retention_chunk import (\n    retention_chunkwise,\n)" in out
    assert "    try:  # triton_missing_pkg" in out and "        import triton_missing_pkg.language as tl" in out
    ns: dict = {}
    exec(compile(out.replace("from .retention_chunk", "from distill_dag.kernels.retention.chunk"), "m", "exec"), ns)
    with pytest.raises(ImportError, match="triton_missing_pkg"):  # same behaviour as the original: raised when used
        ns["f"]()


def test_save_pretrained_weights_follow_the_umask(tmp_path):
    model = RetNetForCausalLM(student_config("tiny", 64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32))
    model.save_pretrained(tmp_path / "m")
    for f in (tmp_path / "m").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == FILE_MODE, f.name
