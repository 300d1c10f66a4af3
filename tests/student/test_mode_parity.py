"""The loss the trainer computes is the same whichever provider serves the teacher (acceptance of the
distillation engine: direct == cached on the same batch)."""

from __future__ import annotations

import pytest
import torch

from distill_dag.data.dataset import make_loader
from distill_dag.teacher.cache.writer import write_logit_cache
from distill_dag.loss.kd import distill_loss
from distill_dag.teacher.model import load_teacher
from distill_dag.teacher.providers.cached import CachedTeacher
from distill_dag.teacher.providers.direct import DirectTeacher
from distill_dag.config import TeacherConfig
from distill_dag.model.variants import student_config
from distill_dag.model.retnet import RetNetForCausalLM


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-5), ("fp16", 1e-4)])
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_direct_and_cached_teacher_give_the_same_training_loss(tmp_path, small_corpus, tiny_teacher_dir, dtype, tol, tail):
    k, data = 32, small_corpus["tokenized"]
    teacher = DirectTeacher(load_teacher(TeacherConfig(model_name_or_path=str(tiny_teacher_dir)), torch.device("cpu")),
                            k, "cpu", name=str(tiny_teacher_dir))
    cache_dir = tmp_path / f"cache_{dtype}"
    write_logit_cache(teacher, data, cache_dir, k, batch_rows=16, dtype=dtype)
    cached = CachedTeacher(cache_dir, data, k)

    torch.manual_seed(0)
    student = RetNetForCausalLM(student_config("tiny", teacher.vocab_size, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=64))
    batch = next(iter(make_loader(data, "train", 4, seed=3)))
    hidden = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"]).last_hidden_state
    losses = {}
    for name, provider in (("direct", teacher), ("cached", cached)):
        out = distill_loss(hidden, student.get_output_embeddings().weight, batch["labels"], provider.topk(batch),
                           temperature=2.0, distill_alpha=0.5, tail=tail, chunk_tokens=100)
        losses[name] = out.loss.item()
        assert out.kl.item() > 0
    assert abs(losses["direct"] - losses["cached"]) < tol, losses
