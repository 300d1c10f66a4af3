"""eval_report's hybrid checks read the right numbers: NIAH at the training length and the gap share."""

from distill_dag.defs.assets.evaluation import _hybrid_checks


def _result(hybrid_acc, nats):
    return {"niah_models": {"hybrid student": {"accuracy_at_train_len": hybrid_acc}},
            "niah_teacher_accuracy_at_train_len": 0.97, "niah_train_len": 256,
            "perplexity_rows": [{"model": m, "nats_per_token": v} for m, v in nats.items()]}


def test_hybrid_checks_gate_niah_and_the_share_of_the_ce_only_to_teacher_gap():
    nats = {"CE-only baseline": 4.4, "hybrid student": 3.9, "teacher (adapted)": 3.4}  # closes (4.4-3.9)/1.0
    ok = {c.check_name: c for c in _hybrid_checks(_result(0.8, nats))}
    assert ok["hybrid_retrieves"].passed and ok["hybrid_closes_gap"].passed
    assert abs(ok["hybrid_closes_gap"].metadata["gap_share"].value - 0.5) < 1e-12
    bad = {c.check_name: c for c in _hybrid_checks(_result(0.79, {**nats, "hybrid student": 3.91}))}
    assert not bad["hybrid_retrieves"].passed and not bad["hybrid_closes_gap"].passed
    missing = {c.check_name: c for c in _hybrid_checks({"perplexity_rows": []})}
    assert not any(c.passed for c in missing.values())
