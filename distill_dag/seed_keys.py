"""The seed project's flat config keys and where each went: read by the config loader's "did you
mean" hints and by ``distill migrate-config`` (standard library only, so both can import it)."""

from __future__ import annotations

# seed key -> (our dotted key, or None when there is no equivalent; the note shown with it)
SEED_KEYS: dict[str, tuple[str | None, str]] = {
    # the seed's twelve headline keys
    "model_variant": ("student.variant", "350M | 500M | tiny; the seed's titan_* variants do not exist here"),
    "max_seq_length": ("tokenize.max_seq_length", "row length of the packed data, checked against the manifest"),
    "teacher_model": ("teacher.model_name_or_path", "hub name or local folder"),
    "teacher_topk": ("train.teacher_topk", "same meaning"),
    "distill_alpha": ("train.distill_alpha", "its meaning is inverted: the seed's alpha weights the hard CE, "
                                             "ours weights the KL, so ours = 1 - the seed's"),
    "train_data_path": ("data.tokenized_dir", "the packed folder (manifest.json + shards) of `distill preprocess`"),
    "val_data_path": (None, "the val split lives in the same manifest as train (tokenize.val_fraction at "
                            "preprocess time); preprocess train and val into one folder"),
    "num_workers": (None, "the parquet loader reads its row groups in the training process (DataLoader "
                          "num_workers 0): there is no key for it"),
    "use_pretokenized_data": (None, "training always reads pretokenized shards (data.tokenized_dir); raw JSONL "
                                    "goes through `distill preprocess` first"),
    "teacher_adapter_path": ("teacher.adapter_path", "peft adapter folder"),
    "cache_logits": ("train.teacher_mode", "true -> cached: train from the logit cache (logit_cache.dir), filled "
                                           "by `distill cache-logits` or the logit_cache asset; false -> dropped"),
    "cache_dir": ("logit_cache.dir", "the logit cache folder"),
    # the other common seed keys
    "teacher_mode": ("train.teacher_mode", "direct | cached | network"),
    "teacher_url": ("teacher.url", "network mode"),
    "teacher_temperature": ("train.temperature", "applied to teacher and student alike"),
    "teacher_timeout": ("teacher.timeout_s", "seconds"),
    "teacher_max_retries": ("teacher.max_retries", "same meaning"),
    "tokenizer_name": ("tokenizer.name_or_path", "must be the teacher's tokenizer for KD"),
    "learning_rate": ("train.learning_rate", "AdamW's peak LR (Muon's is train.muon_learning_rate)"),
    "weight_decay": ("train.weight_decay", "same meaning"),
    "max_steps": ("train.max_steps", "optimizer steps"),
    "physical_batch_size": ("train.batch_size", "rows per micro-batch"),
    "gradient_accumulation_steps": ("train.grad_accum", "micro-batches per optimizer step"),
    "max_grad_norm": ("train.grad_clip", "same meaning"),
    "optimizer_type": ("train.optimizer", "muon | adamw"),
    "muon_momentum": ("train.muon_momentum", "same meaning"),
    "warmup_steps": ("train.warmup_steps", "optimizer steps (the seed's warmup_batches counted micro-batches)"),
    "output_dir": ("train.output_dir", "the run folder"),
    "save_interval": ("train.save_interval", "steps"),
    "eval_interval": ("train.eval_interval", "steps (0 = never)"),
    "log_interval": ("train.log_interval", "steps"),
    "keep_last_n": ("train.keep_checkpoints", "same meaning"),
    "resume_from": ("train.resume_from", "a checkpoint or run folder"),
    "seed": ("train.seed", "same meaning"),
    "device": ("train.device", "auto | cpu | cuda (a device index is dropped)"),
    "pretrain_ce_only": ("train.pretrain_ce_only", "same meaning"),
    "gradient_checkpointing": ("student.gradient_checkpointing", "same meaning"),
    "eval_niah": ("eval.niah", "same meaning"),
    "wandb_project": ("wandb.project", "same meaning"),
    "saddle_escape_interventions_enabled": ("train.enable_saddle_interventions", "same meaning"),
    "saddle_escape_cooldown_steps": ("train.saddle_cooldown", "steps"),
}
