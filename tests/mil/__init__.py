"""Tests of the reference executor (sdbuild.mil)."""
