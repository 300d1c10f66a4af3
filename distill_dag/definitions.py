"""The Dagster code location: every definition under ``distill_dag/defs/``, loaded the ``dg`` way.

``defs/assets/`` holds the assets and their checks, ``defs/jobs.py`` the jobs, the schedule and the sensor,
``defs/resources.py`` the resources bound to the environment. ``dg check defs`` and ``dg dev`` read the same
tree (``[tool.dg]`` in pyproject.toml); ``dagster dev -m distill_dag.definitions`` loads this module.

Kept free of torch/transformers imports at module level: the multiprocess executor re-imports this module for
every step, and the heavy libraries are imported inside the assets that need them.
"""

from pathlib import Path

import dagster as dg

import distill_dag.defs

# The package's own folder is the project root, so the tree loads the same from a wheel as from a checkout.
defs = dg.ComponentTree.from_module(
    defs_module=distill_dag.defs, project_root=Path(__file__).resolve().parent,
).build_defs()
