"""Imported last by the stage server (``executor.STAGE_SERVER_PRELOAD``): tidies what the imports left in TMPDIR."""

from sdbuild.stages.server import tidy

tidy()
