"""Calibrate: the unet's activation ranges for int8 activations (W8A8), measured on real prompts.

The calibration prompts run through the float16 build's own text-to-image
pipeline on the reference executor: its text encoder and unet packages from
the convert stage, the tokenizer and scheduler of the download. Keyed by the
prompts, seed, steps and guidance scale (``compression.calibration``) and the
two packages' keys. The scheduler is declared here; the stage's function is
``sdbuild.generate.calibrate:run``, since running prompts takes the image
pipeline, which sits above the stages (it reads what they write).
"""

from __future__ import annotations

SCHEDULER = "DDIM"
