"""A traced component (``module.pt`` + its I/O) to a saved ML program package."""

from __future__ import annotations

from pathlib import Path


def conversion_pipeline(precision: str, upcast_attention: bool = False):
    """coremltools' default pass pipeline; for float16, with ``add_fp16_cast_folding`` in ``add_fp16_cast``'s place.

    ``upcast_attention``: attention scores and softmax stay float32
    (``precision.cast_all_but_attention_scores``). The selector is always
    set: a registered pass is one object, and an option left from an earlier
    conversion in the same process would otherwise still apply.
    (``ct.convert`` sets options on ``common::add_fp16_cast`` only for a
    ``FP16ComputePrecision`` object, not for ``ct.precision.FLOAT16``.)
    """
    import coremltools as ct

    from sdbuild.convert.precision import PASS_NAME, cast_all, cast_all_but_attention_scores

    pipeline = ct.PassPipeline.DEFAULT
    if precision == "float16":
        passes = list(pipeline.passes)
        passes[passes.index("common::add_fp16_cast")] = PASS_NAME
        pipeline.passes = passes
        selector = cast_all_but_attention_scores if upcast_attention else cast_all
        pipeline.set_options(PASS_NAME, {"op_selector": selector})
    return pipeline


def _input_shape(spec: dict):
    """An input's declared shape: fixed, or ``ct.EnumeratedShapes`` when ``spec`` lists several (default first)."""
    import coremltools as ct

    if spec.get("shapes"):
        shapes = [tuple(s) for s in spec["shapes"]]
        return ct.EnumeratedShapes(shapes=shapes, default=shapes[0])
    return tuple(spec["shape"])


def convert_traced(
    module_path: Path,
    inputs: list[dict],
    outputs: list[str],
    precision: str,
    target: str,
    package: Path,
    upcast_attention: bool = False,
    placeholders=None,
) -> int:
    """Convert the TorchScript file ``module_path`` and save it as the package ``package``.

    ``inputs``: [{name, shape, dtype}] in the module's argument order, each
    declared with its ``dtype`` (``float16`` | ``float32``, float32 when
    absent) as Apple's converter declares it (docs/interface.md);
    ``outputs``: output names in order, float32 whatever ``precision``
    (``float16`` | ``float32``) the model computes in. ``target``: minimum
    deployment target name (``macOS14``). An input with ``shapes`` (a list,
    the default first) takes any of them (``ct.EnumeratedShapes``; the module
    must have been traced shape-generic). ``upcast_attention``: the model's
    config asks for attention scores in float32 (SD 2.1's unet). The saved
    package carries no conversion date and is the same bytes for the same
    module (``sdbuild.mlpackage``).

    ``placeholders`` (a ``placeholders.Record``): the module holds placeholders for these weights;
    they stay placeholders through the conversion and the real ones are written into the saved
    package, blob by blob. ``placeholders.Refused`` where that cannot be shown to give the package
    the module with its weights gives (the caller converts that one). Returns the blobs bound.
    """
    import contextlib

    import coremltools as ct
    import numpy as np

    from sdbuild.convert.placeholders import Conversion
    from sdbuild.convert import precision as _registers_pass  # noqa: F401
    from sdbuild.mil.validation import validate_once_per_pipeline
    from sdbuild.mlpackage import CONVERSION_DATE, make_reproducible

    conversion = Conversion(placeholders) if placeholders is not None else None
    with validate_once_per_pipeline(), conversion.passes() if conversion else contextlib.nullcontext():
        mlmodel = ct.convert(
            # A path, not a module: the converter loads it and lets go of it once its
            # weights are in the program, so the float32 weights are not held twice.
            str(module_path),
            source="pytorch",
            # Each input in the dtype Apple's pipelines feed it (their Python pipeline checks it exactly).
            inputs=[ct.TensorType(name=i["name"], shape=_input_shape(i), dtype=np.dtype(i.get("dtype", "float32"))) for i in inputs],
            outputs=[ct.TensorType(name=n, dtype=np.float32) for n in outputs],
            convert_to="mlprogram",
            minimum_deployment_target=getattr(ct.target, target),
            compute_precision=ct.precision.FLOAT16 if precision == "float16" else ct.precision.FLOAT32,
            pass_pipeline=conversion_pipeline(precision, upcast_attention),
            skip_model_load=True,
        )
    # A date would make every conversion of the same module a different package.
    mlmodel.user_defined_metadata.pop(CONVERSION_DATE, None)
    found = conversion.check_program(mlmodel._mil_program) if conversion else {}
    mlmodel.save(str(package))
    del mlmodel
    bound = conversion.bind_package(package, found) if conversion else 0
    make_reproducible(package)
    return bound
