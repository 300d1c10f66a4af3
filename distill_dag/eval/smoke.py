"""Does a checkpoint folder load as a Hugging Face causal LM and generate? (the students' asset check)"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import distill_dag  # noqa: F401  (registers the RetNet with transformers' Auto classes)


def loads_and_generates(final_dir: str | Path, prompt_ids: list[int], max_new_tokens: int = 8) -> tuple[bool, str]:
    """Load ``final_dir`` with ``AutoModelForCausalLM`` (the package's Auto registration), score the
    prompt, and greedily generate ``max_new_tokens``; passes when logits are finite and tokens came out."""
    try:
        model = AutoModelForCausalLM.from_pretrained(final_dir).eval()
    except Exception as err:  # the check reports any failure to load, whatever raised it
        return False, f"{final_dir}: does not load with AutoModelForCausalLM ({type(err).__name__}: {err})"
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        logits = model(ids).logits
        if not torch.isfinite(logits).all():
            return False, f"{final_dir}: non-finite logits on a {len(prompt_ids)}-token prompt"
        out = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
    new = out.shape[1] - ids.shape[1]
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item() if len(prompt_ids) > 1 else math.nan
    ok = new == max_new_tokens
    return ok, f"loads, prompt loss {nll:.3f} nats/token, generated {new}/{max_new_tokens} tokens"
