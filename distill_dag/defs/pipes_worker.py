"""The external side of ``student_ckpt`` / ``student_ce_baseline`` under ``train.launcher: torchrun``
(Dagster Pipes).

Every rank runs the same trainer; rank 0 holds the Pipes connection, streams its log lines and reports
the materialization. Pipes sends SIGINT to its direct child (torchrun), which forwards it to the
ranks; the trainer checkpoints on SIGINT/SIGTERM, so a cancelled run resumes with --resume-from.
"""

import os

from dagster_pipes import open_dagster_pipes

from distill_dag.config import config_from_dict


def _run(extras: dict, echo=None):
    from distill_dag.student.run import run_ce_baseline, run_kd_student  # lazy: torch waits for the Pipes context

    cfg = config_from_dict(extras["config"], "pipes extras")
    return (run_kd_student if extras.get("stage", "kd") == "kd" else run_ce_baseline)(cfg, echo=echo)


def main() -> None:
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        _run(_extras_from_env())
        return
    with open_dagster_pipes() as pipes:
        from distill_dag.student.run import run_metadata  # lazy: torch waits for the Pipes context

        run = _run({"config": pipes.get_extra("config"), "stage": pipes.get_extra("stage")}, echo=pipes.log.info)
        meta = {k: {"raw_value": v, "type": kind} for k, (kind, v) in run_metadata(run).items()}
        pipes.report_asset_materialization(metadata=meta)


def _extras_from_env() -> dict:
    """Ranks other than 0 read the same Pipes context (the launcher passes it to every rank's env)."""
    from dagster_pipes import PipesDefaultContextLoader, PipesEnvVarParamsLoader

    params = PipesEnvVarParamsLoader().load_context_params()
    with PipesDefaultContextLoader().load_context(params) as data:
        return data["extras"]


if __name__ == "__main__":
    main()
