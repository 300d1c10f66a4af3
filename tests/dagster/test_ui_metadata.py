"""What the asset pages' metadata shows, as found in Chromium on a fresh clone's `make demo` (issue 32):
the KL panel drew the CE-only student as a flat line at 0, the lm-eval table hid its scores and shares
off to the right, and table floats carried six digits."""

from __future__ import annotations

import pytest

from distill_dag.eval import plots


def _history(kl: list[float]) -> list[dict]:
    return [{"kind": "train", "step": 10 * (i + 1), "ce": 5.0 - 0.1 * i, "kl": v} for i, v in enumerate(kl)]


def test_kl_panel_leaves_out_steps_and_runs_without_a_teacher():
    # the trainer logs kl 0.0 where no teacher ran: every step of a CE-only run, a KD run's CE warm-up
    runs = {"KD": _history([0.0, 0.0, 1.5, 1.2]), "CE only": _history([0.0, 0.0, 0.0, 0.0])}
    title, _, kl = plots.training_panels(runs)[2]
    assert title == "KD term (KL to the teacher)"
    assert kl == {"KD": [(30, 1.5), (40, 1.2)]}  # the measured steps only; no CE-only line at 0
    # the CE panels keep both runs, every step
    assert [len(v) for v in plots.training_panels(runs)[0][2].values()] == [4, 4]


def test_lm_eval_table_is_one_row_per_task_and_model_with_the_share_beside_the_model():
    from distill_dag.defs.assets.evaluation import lm_eval_long
    from distill_dag.eval.harness import share_rows

    scores = {"teacher": {"a": {"metric": "acc", "value": 0.9, "higher_is_better": True},
                          "b": {"metric": "exact_match", "value": 0.5, "higher_is_better": True}},
              "student": {"a": {"metric": "acc", "value": 0.6, "higher_is_better": True},
                          "b": {"metric": "exact_match", "value": 0.1, "higher_is_better": True}}}
    rows, _ = share_rows(scores, "teacher", ["a", "b"])
    long = lm_eval_long(rows)
    # the columns a narrow UI cell shows first: task, model, share; then score and metric
    assert all(list(r) == ["task", "model", "share of teacher", "score", "metric"] for r in long)
    got = {(r["task"], r["model"]): (r["share of teacher"], r["score"]) for r in long}
    assert got == {("a", "teacher"): (None, 0.9), ("a", "student"): (0.67, 0.6),  # 0.6 / 0.9 = 0.667
                   ("b", "teacher"): (None, 0.5), ("b", "student"): (0.2, 0.1),   # 0.1 / 0.5
                   ("mean share", "student"): (0.43, None)}                      # (0.667 + 0.2) / 2 = 0.433
    assert {r["metric"] for r in long if r["task"] == "b"} == {"exact_match"}


def test_table_floats_have_four_significant_digits():
    from distill_dag.defs.assets.common import table

    t = table([{"model": "student", "ppl": 69.82061234, "tokens": 20392}, {"model": "teacher", "ppl": 2096.6812, "tokens": 1}])
    assert [r.data["ppl"] for r in t.value.records] == [pytest.approx(69.82, abs=0), pytest.approx(2097.0, abs=0)]
    assert [r.data["tokens"] for r in t.value.records] == [20392, 1]  # integers are counts: never rounded


def test_a_lora_teacher_on_a_random_init_base_is_refused_before_training(tmp_path):
    """The browser backfill's cause (issue 32): teacher_adapters trained LoRA on a random-init base it never
    saves, then every logit_cache partition failed to load the teacher. Now teacher_adapters refuses at once,
    naming both keys and the fix, and writes nothing."""
    import dagster as dg
    import yaml

    from distill_dag.defs.assets.teacher import teacher_adapters
    from distill_dag.defs.resources import PipelineConfigResource

    out = tmp_path / "teacher_ft"
    cfg = {"data": {"root": str(tmp_path / "data")},
           "teacher": {"model_name_or_path": None, "init_tiny": {"hidden_size": 32, "intermediate_size": 64,
                                                                  "num_hidden_layers": 1, "num_attention_heads": 2}},
           "teacher_ft": {"mode": "lora", "output_dir": str(out)}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    result = dg.materialize([teacher_adapters], raise_on_error=False,
                            resources={"pipeline": PipelineConfigResource(config_file=str(tmp_path / "cfg.yaml"))})
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.step_failure_data.user_failure_data.description
    assert "teacher.model_name_or_path is null" in message and "teacher_ft.mode is lora" in message
    assert "Set teacher_ft.mode: full" in message
    assert not out.exists()  # refused before the finetune wrote anything
