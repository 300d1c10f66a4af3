"""Hybrid conversion: the teacher's attention kept verbatim in chosen layers, and the KL-guided choice."""

from __future__ import annotations

import pytest
import torch
from support import tiny_llama

from distill_dag.student.layer_choice import attention_layer_gains, choose_attention_layers, kl_to_teacher
from distill_dag.model.convert import convert_teacher, hybridize

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 97


def _teacher(layers=3, seed=0):
    model = tiny_llama(VOCAB, seed, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=True, rope_theta=500.0, rms_norm_eps=1e-5)
    with torch.no_grad():  # non-trivial attention patterns and norm gains (random init is near-uniform)
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "norm" in name else 0.1))
    return model.float().eval()


def _packed(B=2, T=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    pos = torch.stack([torch.cat([torch.arange(23), torch.arange(T - 23)]), torch.arange(T)])
    return ids, pos


def test_every_layer_kept_the_converted_student_computes_the_teachers_logits():
    teacher = _teacher()
    student, conv = convert_teacher(teacher, layer_types=["full_attention"] * 3)
    assert {m.teacher for m in conv.mapping} == set(teacher.state_dict())
    assert conv.new_params == []  # nothing left to learn: every tensor is the teacher's
    ids, pos = _packed()
    with torch.no_grad():
        want = teacher(input_ids=ids, position_ids=pos, use_cache=False).logits
        got = student.eval()(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_every_layer_kept_generates_what_the_teacher_generates():
    teacher = _teacher(layers=2)
    student, _ = convert_teacher(teacher, layer_types=["full_attention"] * 2)
    prompt = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        a = teacher.generate(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10)
        b = student.eval().generate(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10)
    assert torch.equal(a, b)


def test_hybridize_keeps_the_students_other_weights_and_copies_the_teachers_attention():
    teacher = _teacher()
    pure, _ = convert_teacher(teacher)
    with torch.no_grad():  # stand-in for stage 1: retention weights that differ from the conversion
        pure.model.layers[0].retention.g_proj.weight.add_(0.5)
    hyb, kept = hybridize(pure, teacher, [1])
    assert hyb.config.layer_types == ["linear_attention", "full_attention", "linear_attention"]
    torch.testing.assert_close(hyb.model.layers[0].retention.g_proj.weight, pure.model.layers[0].retention.g_proj.weight)
    torch.testing.assert_close(hyb.model.layers[1].attention.k_proj.weight, teacher.model.layers[1].self_attn.k_proj.weight)
    # the attention and its input norm come from the teacher; the FFN and its norm stay the student's
    assert {m.teacher for m in kept} == {f"model.layers.1.{n}.weight" for n in (
        "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")}


def test_auto_choice_picks_the_layer_whose_restoration_lowers_the_kl_most():
    # Constructed: layers 0 and 2 have a zero attention output (their retention copy is exact: O = 0 too),
    # layer 1's attention output is large. Only restoring layer 1 can close the gap, and it closes all of it.
    teacher = _teacher()
    with torch.no_grad():
        teacher.model.layers[0].self_attn.o_proj.weight.zero_()
        teacher.model.layers[2].self_attn.o_proj.weight.zero_()
        teacher.model.layers[1].self_attn.o_proj.weight.mul_(4.0)
    pure, _ = convert_teacher(teacher)
    ids, pos = _packed()
    batches = [{"input_ids": ids, "position_ids": pos, "attention_mask": torch.ones_like(ids)}]
    rows = attention_layer_gains(pure, teacher, batches, torch.device("cpu"))
    assert [r["layer"] for r in rows] == [0, 1, 2]
    assert rows[1]["kl"] < 1e-6 < rows[0]["kl_pure"]
    assert abs(rows[0]["gain"]) < 1e-6 and abs(rows[2]["gain"]) < 1e-6
    assert choose_attention_layers(rows, 1) == [1]
    hyb, _ = hybridize(pure, teacher, [1])
    assert kl_to_teacher(hyb, teacher, batches, torch.device("cpu")) < 1e-6
