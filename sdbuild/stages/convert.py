"""Convert: the traced module to a Core ML ML program (.mlpackage)."""

from __future__ import annotations

from pathlib import Path

from sdbuild.stages import Job
from sdbuild.stages.trace import read_io

PACKAGE = "model.mlpackage"


def deployment_target(name: str):
    import coremltools as ct

    return getattr(ct.target, name)


def run(job: Job, out: Path) -> dict:
    """Write ``model.mlpackage`` with the contract's input and output names."""
    import coremltools as ct
    import numpy as np
    import torch

    trace_dir = job.upstream["trace"]
    io = read_io(trace_dir)
    traced = torch.jit.load(str(trace_dir / "module.pt"))
    precision = ct.precision.FLOAT16 if io["precision"] == "float16" else ct.precision.FLOAT32
    mlmodel = ct.convert(
        traced,
        # float32 model inputs and outputs, as Apple's pipelines feed and read them; a float16
        # input would also round token ids above 2048 before the graph casts them to integers.
        inputs=[ct.TensorType(name=i["name"], shape=tuple(i["shape"]), dtype=np.float32) for i in io["inputs"]],
        outputs=[ct.TensorType(name=n, dtype=np.float32) for n in io["outputs"]],
        convert_to="mlprogram",
        minimum_deployment_target=deployment_target(job.fields["target"]),
        compute_precision=precision,
        skip_model_load=True,
    )
    del traced
    mlmodel.save(str(out / PACKAGE))
    return {"precision": io["precision"]}
