"""coremltools' program check, once per pass pipeline instead of after every pass.

``PassPipelineManager.apply_pipeline`` validates the whole program before the
pipeline and again after each of its ~110 passes. The check reads the program
and changes nothing, yet it is 40 % of a conversion's time (a tiny unet:
15 s of 37 s under the profiler) and grows with ops times passes, so it costs
more still on full-size models. ``validate_once_per_pipeline`` keeps the check
and runs it once, on each pipeline's result: a pass that leaves the program
broken still fails the conversion, with coremltools' own message, and the
package written is the same bytes (``tests/test_convert_validation.py``).
"""

from __future__ import annotations

from contextlib import contextmanager


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
