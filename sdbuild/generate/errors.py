"""The error every generate room raises for a request that cannot be met."""

from __future__ import annotations

from sdbuild.errors import SdbuildError


class GenerationError(SdbuildError):
    """A generate request that cannot be met: missing bundle file, bad image, unknown scheduler… (exit status 2)."""

    exit_code = 2
