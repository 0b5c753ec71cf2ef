"""Tests of the conversion-friendly modules (sdbuild.models)."""
