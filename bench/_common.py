"""What the benches share: the project's folders, the flags every bench has, writing results, and the
Llama-3.2-1B teacher shape of the real-shape benches. Standard library only (a bench's ``--help`` stays
light); it is a helper, not a bench (tests/bench runs every ``bench/*.py`` but the ``_`` ones).

A bench imports it the way it was started, with no ``sys.path`` surgery:

    if __package__:  # python -m bench.NAME
        from bench._common import ROOT, bench_parser
    else:  # python bench/NAME.py, from any folder: bench/ is sys.path[0]
        from _common import ROOT, bench_parser

``distill_dag`` itself comes from the (editable) install, or from ``PYTHONPATH`` where there is none
(bench/gpu_check.sh on a lent GPU machine).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent  # the project root
OUT = ROOT / "bench" / "out"  # plots and results a bench keeps (ignored by git)
GiB = 2**30

# Llama-3.2-1B's config.json (architecture fields), exactly
LLAMA_3_2_1B: dict[str, Any] = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, hidden_act="silu",
    max_position_embeddings=131072, rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False,
    tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001, initializer_range=0.02,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "high_freq_factor": 4.0,
                     "low_freq_factor": 1.0, "original_max_position_embeddings": 8192},
)
# --quick: the same structure (GQA, llama3 rope scaling, tied embeddings) at toy width
LLAMA_TINY: dict[str, Any] = dict(
    LLAMA_3_2_1B, vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=16384,
    bos_token_id=1000, eos_token_id=1001,
)


def bench_parser(description: str, quick: str) -> argparse.ArgumentParser:
    """A bench's parser with the flag every bench has: ``--quick`` (tiny sizes, seconds; what tests/bench runs)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help=quick)
    return ap


def add_threads(ap: argparse.ArgumentParser, default: int = 1, help: str | None = None) -> None:
    """``--threads``: torch's intra-op threads (the bench calls ``torch.set_num_threads`` with it)."""
    ap.add_argument("--threads", type=int, default=default, help=help)


def add_json(ap: argparse.ArgumentParser, help: str = "write the results here") -> None:
    """``--json PATH``: every number of the run, written by :func:`write_json`."""
    ap.add_argument("--json", default=None, help=help)


def write_json(path: str | Path, result: Any) -> None:
    """A bench's results as indented JSON (values JSON cannot hold as their ``str``)."""
    Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n")
