"""The student's ``final`` folder as a Hugging Face Hub model: shipped modeling code, ``auto_map``, special
token ids, the trained length on the tokenizer and a model card (``README.md``).

:func:`prepare_hf_folder` (used by :func:`distill_dag.training.checkpoint.write_final`): the modeling code is
written beside the weights (:mod:`distill_dag.model.shipped_code`); ``config.json`` gets ``auto_map`` and
``eos/pad/bos_token_id`` from the tokenizer, ``generation_config.json`` the same ids (``generate`` stops at
EOS), ``tokenizer_config.json`` ``model_max_length`` = the trained row length; then the card
(:mod:`distill_dag.model.model_card`).

A folder prepared this way loads in any Python with torch and transformers, without distill_dag::

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # it reads config.json, whose AutoConfig is shipped

and uploads as it is: ``huggingface_hub.HfApi().upload_folder(folder_path=folder, repo_id=...)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill_dag.io import write_json_atomic
from distill_dag.model.model_card import CARD, CARD_FACTS, read_folder_json, run_facts, update_model_card
from distill_dag.model.shipped_code import AUTO_MAP, write_modeling_code

# files whose content changes after the folder is written (the eval fills the card in): not in checksums.json
UNCHECKSUMMED = frozenset({CARD, CARD_FACTS, "checksums.json"})


def special_token_ids(folder: str | Path) -> dict[str, int | None]:
    """``{"eos_token_id", "pad_token_id", "bos_token_id"}`` of the tokenizer saved in ``folder`` (pad falls back to
    EOS, as the pipeline's tokenizers do); ``{}`` when the folder holds no tokenizer."""
    folder = Path(folder)
    if not (folder / "tokenizer_config.json").exists():
        return {}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    return {"eos_token_id": eos, "pad_token_id": pad, "bos_token_id": tok.bos_token_id}


def prepare_hf_folder(folder: str | Path, *, max_length: int | None = None,
                      card: dict[str, Any] | None = None) -> dict[str, Any]:
    """Make a saved student folder a Hub model (see the module doc). ``max_length``: the trained row length
    (default: ``tokenize.max_seq_length`` of the folder's ``run.json``). ``card``: extra card facts.

    Returns what was set (``ids``, ``max_length``, ``code`` files)."""
    folder = Path(folder)
    run = read_folder_json(folder / "run.json")
    if max_length is None:
        max_length = (run.get("config") or {}).get("tokenize", {}).get("max_seq_length")
    ids = special_token_ids(folder)  # before config.json has an auto_map

    code = write_modeling_code(folder)
    config = read_folder_json(folder / "config.json")
    if not config:
        raise FileNotFoundError(f"{folder / 'config.json'} is missing: not a saved model")
    config["auto_map"] = dict(AUTO_MAP)
    config.update(ids)
    write_json_atomic(folder / "config.json", config)

    gen = read_folder_json(folder / "generation_config.json")
    gen.update({k: v for k, v in ids.items() if v is not None})
    if gen:
        gen.setdefault("transformers_version", config.get("transformers_version"))
        write_json_atomic(folder / "generation_config.json", gen)

    tok_cfg = folder / "tokenizer_config.json"
    if tok_cfg.exists() and max_length:
        t = read_folder_json(tok_cfg)
        t["model_max_length"] = int(max_length)
        write_json_atomic(tok_cfg, t)

    facts = {"run": run_facts(run, folder), "ids": ids, "max_length": max_length}
    update_model_card(folder, **facts, **(card or {}))
    return {"ids": ids, "max_length": max_length, "code": code}

