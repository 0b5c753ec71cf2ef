"""coremltools' pass pipelines without the work whose result nobody reads.

``PassPipelineManager.apply_pipeline`` validates the whole program before the
pipeline and again after each of its ~110 passes. The check reads the program
and changes nothing, yet it is 40 % of a conversion's time (a tiny unet:
15 s of 37 s under the profiler) and grows with ops times passes, so it costs
more still on full-size models. ``validate_once_per_pipeline`` keeps the check
and runs it once, on each pipeline's result: a pass that leaves the program
broken still fails the conversion, with coremltools' own message, and the
package written is the same bytes (``tests/test_convert_validation.py``).

Inside a pipeline it also leaves the program unprinted where coremltools'
logger drops debug lines: the pipeline and the transpose pass format the whole
program into their debug lines (f-strings, built before the logger looks at
the level), 16 printouts of a tiny unet's program per conversion.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext

UNPRINTED = "<program: printed when coremltools' logger is at DEBUG>"


@contextmanager
def validate_once_per_pipeline():
    from coremltools.converters.mil.mil.passes.pass_pipeline import PassPipelineManager
    from coremltools.converters.mil.mil.program import Program

    apply_pipeline = PassPipelineManager.__dict__["apply_pipeline"]
    validate = Program.validate
    inside = [0]

    def quiet_validate(self, *args, **kwargs):
        if not inside[0]:
            validate(self, *args, **kwargs)

    def checked_once(prog, pass_pipeline):
        inside[0] += 1
        try:
            with _unprinted() if inside[0] == 1 else nullcontext():
                apply_pipeline.__func__(prog, pass_pipeline)
        finally:
            inside[0] -= 1
        if not inside[0]:
            validate(prog)

    Program.validate = quiet_validate
    PassPipelineManager.apply_pipeline = staticmethod(checked_once)
    try:
        yield
    finally:
        Program.validate = validate
        PassPipelineManager.apply_pipeline = apply_pipeline


@contextmanager
def _unprinted():
    """Programs, functions and blocks print as ``UNPRINTED`` while debug lines are dropped."""
    from coremltools.converters.mil.mil import Block, Function, Program

    if logging.getLogger("coremltools").isEnabledFor(logging.DEBUG):
        yield
        return
    saved = [(cls, cls.__dict__["__str__"]) for cls in (Program, Function, Block)]
    for cls, _ in saved:
        cls.__str__ = lambda self, *args, **kwargs: UNPRINTED
    try:
        yield
    finally:
        for cls, method in saved:
            cls.__str__ = method
