"""train.autocast: where bf16 autocast is on, that the training loops use it (and evaluation does not),
and that an autocast run follows the float32 one."""

import pytest
import torch

from support import cfg_dict

from distill_dag import device as device_mod
from distill_dag.config import ConfigError, config_from_dict
from distill_dag.device import autocast, autocast_enabled

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_is_on_for_cuda_and_native_bf16_cpus_only_and_config_refuses_other_values(monkeypatch):
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: False)
    assert not autocast_enabled(CPU, "auto") and autocast_enabled(CUDA, "auto")
    assert autocast_enabled(CPU, "bfloat16") and not autocast_enabled(CUDA, "off")
    with autocast(CPU, "auto"):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: True)
    assert autocast_enabled(CPU, "auto") and not autocast_enabled(CPU, "off")
    assert not autocast_enabled(torch.device("meta"), "bfloat16")
    with autocast(CPU, "auto"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="train.autocast"):
        autocast_enabled(CPU, "fp8")
    with pytest.raises(ConfigError, match="train.autocast"):
        config_from_dict({"train": {"autocast": "float16"}})


def _student_cfg(tmp_path, corpus, teacher_dir, precision, **kw):
    base = dict(max_steps=4, eval_interval=0, save_interval=0, autocast=precision)
    return config_from_dict(cfg_dict(tmp_path, corpus, teacher_dir, **{**base, **kw}))


def test_student_training_runs_under_autocast_and_follows_the_float32_run(tmp_path, small_corpus, tiny_teacher_dir,
                                                                         monkeypatch):
    from distill_dag.training import distributed as distributed_mod
    from distill_dag.student.trainer import evaluate_loss, train

    seen = []
    real = distributed_mod.distill_loss

    def spy(hidden, *a, **kw):
        seen.append((torch.is_autocast_enabled("cpu"), torch.is_grad_enabled()))
        return real(hidden, *a, **kw)

    monkeypatch.setattr(distributed_mod, "distill_loss", spy)
    data = small_corpus["tokenized"]
    runs = {}
    for precision in ("off", "bfloat16"):
        seen.clear()
        runs[precision] = train(_student_cfg(tmp_path / precision, small_corpus, tiny_teacher_dir, precision))
        train_calls = [on for on, grad in seen if grad]
        assert train_calls and all(on == (precision == "bfloat16") for on in train_calls), (precision, seen)
    # the same data, init and schedule: the bf16 run's losses track the fp32 run's (bf16 keeps ~3 digits)
    losses = {p: [h["loss"] for h in r.history if h["kind"] == "train"] for p, r in runs.items()}
    assert len(losses["off"]) == len(losses["bfloat16"]) == 4
    assert losses["bfloat16"] != losses["off"]  # it really ran in another precision
    for a, b in zip(losses["off"], losses["bfloat16"]):
        assert b == pytest.approx(a, rel=0.02)
    # held-out evaluation is float32 whatever the training precision
    from distill_dag.data.dataset import make_loader
    from distill_dag.model.retnet import RetNetForCausalLM

    seen.clear()
    student = RetNetForCausalLM.from_pretrained(runs["bfloat16"].final_dir)
    evaluate_loss(student, make_loader(data, "val", 4, shuffle=False, infinite=False), 2, CPU, 1024)
    assert seen and not any(on for on, _ in seen)


def test_teacher_finetune_trains_under_autocast_and_evaluates_in_float32(tmp_path, small_corpus, monkeypatch):
    from distill_dag.teacher import finetune as tf

    tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    seen = []
    real_build = tf.build_model

    def build(*a, **kw):
        model, base = real_build(*a, **kw)
        head = model.get_output_embeddings()
        head.register_forward_hook(lambda mod, inp, out: seen.append((model.training, out.dtype)))
        return model, base

    monkeypatch.setattr(tf, "build_model", build)
    ppl = {}
    for precision in ("off", "bfloat16"):
        seen.clear()
        cfg = config_from_dict({
            "teacher": {"model_name_or_path": None, "init_tiny": tiny},
            "teacher_ft": dict(mode="full", learning_rate=3e-3, batch_size=8, max_steps=3, warmup_steps=1,
                               eval_interval=0, eval_batches=2, save_interval=0, log_interval=1, seed=0),
            "tokenize": {"max_seq_length": 64}, "train": {"device": "cpu", "autocast": precision},
            "wandb": {"mode": "disabled"}})
        m = tf.finetune_teacher(cfg, small_corpus["tokenized"], tmp_path / precision,
                                tokenizer_dir=small_corpus["tokenizer"], log=lambda s: None)
        ppl[precision] = m["val_ppl_after"]
        train_dtypes = {dt for training, dt in seen if training}
        eval_dtypes = {dt for training, dt in seen if not training}
        assert train_dtypes == {torch.bfloat16 if precision == "bfloat16" else torch.float32}, precision
        assert eval_dtypes == {torch.float32}, precision
    assert ppl["bfloat16"] == pytest.approx(ppl["off"], rel=0.05)
