"""torch's compiler cache folder, for a process of ours that imports diffusers.

``import diffusers`` imports ``torch._dynamo``, which makes ``$TMPDIR/torchinductor_<user>``,
names it in ``TORCHINDUCTOR_CACHE_DIR`` and leaves it there. sdbuild compiles nothing with
torch, so a process of ours that imports diffusers gives torch a folder of its own and
removes it when done. A folder the user named in the variable is theirs and stays.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

ENV = "TORCHINDUCTOR_CACHE_DIR"


@contextlib.contextmanager
def private_torch_cache():
    """Within: ``TORCHINDUCTOR_CACHE_DIR`` is a fresh folder in TMPDIR, removed after (unless the user set the variable)."""
    if ENV in os.environ:
        yield None
        return
    folder = tempfile.mkdtemp(prefix="sdbuild-torch-")
    os.environ[ENV] = folder
    try:
        yield folder
    finally:
        if os.environ.get(ENV) == folder:
            del os.environ[ENV]
        shutil.rmtree(folder, ignore_errors=True)
