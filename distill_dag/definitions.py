"""The Dagster code location: every asset, check, resource, job, schedule and sensor."""

from dagster import Definitions

defs = Definitions(assets=[])
