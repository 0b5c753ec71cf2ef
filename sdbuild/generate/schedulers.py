"""Schedulers by name: diffusers' classes under the names Apple's pipelines and web UIs use."""

from __future__ import annotations

import re

from sdbuild.generate.errors import GenerationError


# Canonical name → diffusers class. The names are those of Apple's Python pipeline, shortened.
SCHEDULERS = {
    "DDIM": "DDIMScheduler",
    "DPMSolverMultistep": "DPMSolverMultistepScheduler",
    "Euler": "EulerDiscreteScheduler",
    "EulerAncestral": "EulerAncestralDiscreteScheduler",
    "LMS": "LMSDiscreteScheduler",
    "PNDM": "PNDMScheduler",
    "DDPM": "DDPMScheduler",
}
# Other spellings people use (Apple's CLI, the Swift CLI, web UIs), compared squashed: lower case, no separators.
_SCHEDULER_ALIASES = {
    "dpm++2m": "DPMSolverMultistep",
    "dpmpp2m": "DPMSolverMultistep",
    "dpmpp": "DPMSolverMultistep",
    "dpmsolver": "DPMSolverMultistep",
    "dpmsolvermultistepscheduler": "DPMSolverMultistep",
    "eulerdiscrete": "Euler",
    "eulera": "EulerAncestral",
    "eulerancestraldiscrete": "EulerAncestral",
    "lmsdiscrete": "LMS",
}

def scheduler_name(name: str) -> str:
    """The canonical name (a key of ``SCHEDULERS``) for ``name`` or one of its aliases."""
    squashed = re.sub(r"[\s_\-]", "", name).lower()
    for canonical in SCHEDULERS:
        if squashed in (canonical.lower(), SCHEDULERS[canonical].lower(), canonical.lower() + "scheduler"):
            return canonical
    if squashed in _SCHEDULER_ALIASES:
        return _SCHEDULER_ALIASES[squashed]
    raise GenerationError(f"--scheduler: unknown scheduler '{name}'; choose one of {', '.join(SCHEDULERS)} (or DPM++2M)")


def make_scheduler(name: str, config: dict):
    """A fresh diffusers scheduler of kind ``name`` built from a checkpoint's scheduler ``config``."""
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[scheduler_name(name)])
    return cls.from_config(config)


# --------------------------------------------------------------------------- bundle discovery
