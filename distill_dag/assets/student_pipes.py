"""The external side of ``student_ckpt`` under ``train.launcher: torchrun`` (Dagster Pipes).

Every rank runs the same trainer; rank 0 holds the Pipes connection, streams its log lines and reports
the materialization. Pipes sends SIGINT to its direct child (torchrun), which forwards it to the
ranks; the trainer checkpoints on SIGINT/SIGTERM, so a cancelled run resumes with --resume-from.
"""

import os

from dagster_pipes import open_dagster_pipes

from distill_dag.config import config_from_dict


def main() -> None:
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        from distill_dag.distill.student_run import run_student

        run_student(config_from_dict(_config_from_env()))
        return
    with open_dagster_pipes() as pipes:
        from distill_dag.assets.student import student_metadata
        from distill_dag.distill.student_run import run_student

        cfg = config_from_dict(pipes.get_extra("config"), "pipes extras")
        out = run_student(cfg, echo=pipes.log.info)
        meta = {k: {"raw_value": v, "type": kind} for k, (kind, v) in student_metadata(out).items()}
        pipes.report_asset_materialization(metadata=meta)


def _config_from_env() -> dict:
    """Ranks other than 0 read the same Pipes context (the launcher passes it to every rank's env)."""
    from dagster_pipes import PipesDefaultContextLoader, PipesEnvVarParamsLoader

    params = PipesEnvVarParamsLoader().load_context_params()
    with PipesDefaultContextLoader().load_context(params) as data:
        return data["extras"]["config"]


if __name__ == "__main__":
    main()
