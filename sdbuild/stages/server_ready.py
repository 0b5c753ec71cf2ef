"""Imported last by the stage server (``executor.STAGE_SERVER_PRELOAD``): tidies what the imports left in TMPDIR,
and sets the libraries' objects aside from the garbage collector.

``gc.freeze`` moves every object alive now (half a million: the modules of torch,
coremltools, diffusers and transformers) to a generation the collector never scans.
Each stage forks with it: its collections walk what the stage made, not the libraries
again (a tiny unet's conversion spent 1.2 CPU-s in the collector, 0.3 with them set aside),
and they no longer write to the library pages a stage shares with the server.
The collector was off while the libraries imported (``server``): the cycles
they left (9 MiB) are frozen with them, kept for the server's life.
"""

import gc

from sdbuild.stages.server import tidy

tidy()
gc.freeze()
