"""Teacher -> RetNet conversion: every teacher tensor placed (none dropped), exact transfer proven by
putting softmax attention back where retention is, GQA head mapping, value-dim layouts, refusals."""

from __future__ import annotations

import pytest
import torch
from support import tiny_llama

from distill_dag.model.convert import (
    ConversionError,
    SoftmaxAttention,
    TeacherAttention,
    convert_teacher,
    student_config_from_teacher,
    swap_retention,
)
from distill_dag.model.retnet import RetNetForCausalLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")


VOCAB = 97


def _teacher(layers=2, heads=4, kv_heads=2, d=32, tie=True, seed=0, **kw):
    model = tiny_llama(VOCAB, seed, hidden_size=d, intermediate_size=48, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                       tie_word_embeddings=tie, rope_theta=500.0, rms_norm_eps=1e-5, **kw)
    with torch.no_grad():  # non-trivial attention patterns and norm gains (random init is near-uniform)
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "norm" in name else 0.1))
    return model


def _packed_batch(B=2, T=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    # two documents in row 0 (boundary at 23), one in row 1
    pos = torch.stack([torch.cat([torch.arange(23), torch.arange(T - 23)]), torch.arange(T)])
    return ids, pos


@pytest.mark.parametrize("tie", [True, False])
def test_mapping_covers_every_teacher_parameter_and_names_the_new_ones(tie):
    teacher = _teacher(tie=tie)
    student, conv = convert_teacher(teacher)
    assert {m.teacher for m in conv.mapping} == set(teacher.state_dict())
    student_names = {n for n, _ in student.named_parameters(remove_duplicate=False)}
    assert {m.student for m in conv.mapping} | set(conv.new_params) == student_names
    expected_new = {f"model.layers.{i}.retention.{p}" for i in range(2)
                    for p in ("g_proj.weight", "group_norm.weight", "group_norm.bias")}
    assert set(conv.new_params) == expected_new
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tie


def test_an_unknown_teacher_parameter_is_an_error_not_dropped():
    teacher = _teacher()
    teacher.model.layers[1].self_attn.register_parameter("extra_scale", torch.nn.Parameter(torch.ones(4)))
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.self_attn\.extra_scale"):
        convert_teacher(teacher)


def test_teacher_biases_are_refused_with_the_config_key():
    with pytest.raises(ConversionError, match="attention_bias"):
        convert_teacher(_teacher(attention_bias=True))


def test_student_shape_follows_the_teacher_and_shape_overrides_conflict():
    teacher = _teacher(layers=3, heads=8, kv_heads=2, d=64)
    sc = student_config_from_teacher(teacher.config, chunk_size=16)
    assert (sc.vocab_size, sc.hidden_size, sc.num_hidden_layers, sc.num_attention_heads, sc.intermediate_size) == \
        (VOCAB, 64, 3, 8, 48)
    assert sc.value_factor == 1 and sc.rope_theta == 500.0 and sc.rms_norm_eps == 1e-5 and sc.chunk_size == 16
    with pytest.raises(ConversionError, match="num_hidden_layers"):
        student_config_from_teacher(teacher.config, num_hidden_layers=2)


def test_grouped_kv_heads_are_repeated_head_by_head():
    teacher = _teacher(heads=4, kv_heads=2, d=32)  # head dim 8, groups of 2
    student, _ = convert_teacher(teacher, value_factor=2)
    tk = teacher.model.layers[0].self_attn.k_proj.weight
    tv = teacher.model.layers[0].self_attn.v_proj.weight
    to = teacher.model.layers[0].self_attn.o_proj.weight
    r = student.model.layers[0].retention
    for h in range(4):
        kv = h // 2  # transformers' repeat_kv: query head h reads kv head h // n_rep
        assert torch.equal(r.k_proj.weight[h * 8:(h + 1) * 8], tk[kv * 8:(kv + 1) * 8])
        # value_factor 2: each head's 16 values = the teacher head's 8, then 8 zero rows / O columns
        assert torch.equal(r.v_proj.weight[h * 16:h * 16 + 8], tv[kv * 8:(kv + 1) * 8])
        assert not r.v_proj.weight[h * 16 + 8:(h + 1) * 16].any()
        assert torch.equal(r.o_proj.weight[:, h * 16:h * 16 + 8], to[:, h * 8:(h + 1) * 8])
        assert not r.o_proj.weight[:, h * 16 + 8:(h + 1) * 16].any()


@pytest.mark.parametrize("layers", [1, 2])
def test_student_with_teacher_attention_in_place_of_retention_reproduces_the_teacher_exactly(layers):
    teacher = _teacher(layers=layers)
    student, _ = convert_teacher(teacher, chunk_size=16)
    student.eval()
    ids, pos = _packed_batch()
    with torch.no_grad():
        want = teacher(input_ids=ids, position_ids=pos, use_cache=False).logits
        swap_retention(student, [TeacherAttention(teacher, i) for i in range(layers)])
        got = student(input_ids=ids, position_ids=pos, use_cache=False).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("value_factor", [1, 2])
def test_softmax_attention_on_the_students_own_qkvo_reproduces_the_teacher(value_factor):
    teacher = _teacher(layers=2, heads=4, kv_heads=2)
    student, _ = convert_teacher(teacher, value_factor=value_factor, chunk_size=16)
    student.eval()
    ids, pos = _packed_batch()
    with torch.no_grad():
        want = teacher(input_ids=ids, position_ids=pos, use_cache=False).logits
        original = [b.retention for b in student.model.layers]
        swap_retention(student, [SoftmaxAttention(r) for r in original])
        got = student(input_ids=ids, position_ids=pos, use_cache=False).logits
        # and with retention back, the student is a different function (nothing was left swapped)
        swap_retention(student, original)
        ret = student(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (ret - want).abs().max() > 0.1


def test_converted_student_round_trips_through_save_pretrained(tmp_path):
    student, _ = convert_teacher(_teacher(), chunk_size=16)
    student.save_pretrained(tmp_path)
    again = RetNetForCausalLM.from_pretrained(tmp_path)
    ids, pos = _packed_batch()
    with torch.no_grad():
        a = student.eval()(input_ids=ids, position_ids=pos, use_cache=False).logits
        b = again.eval()(input_ids=ids, position_ids=pos, use_cache=False).logits
    assert torch.equal(a, b) and again.config.value_factor == 1


def test_a_teacher_family_without_a_table_is_refused_by_model_type():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=64))
    with pytest.raises(ConversionError, match="'gpt2'.*FAMILIES"):
        convert_teacher(gpt2)
