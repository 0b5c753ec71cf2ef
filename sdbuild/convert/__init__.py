"""Memory-bounded conversion of a traced component to an ML program.

The straightforward path (``ct.convert`` of a TorchScript module held by the
caller, float16 by the precision pass) keeps three copies of the weights
alive at its peak: the PyTorch module's float32 tensors, the MIL program's
float32 constants (views of those tensors), and the float16 constants the
precision pass makes for every weight before any float32 one is dropped.
For SD 1.5's unet that is 3.4 + 1.7 GB on top of the traced module.

Here the weights exist once at a time (``program.convert_traced``):

- the converter loads ``module.pt`` itself and drops the TorchScript module
  as soon as its weights are MIL constants, so the float32 weights are held
  only by the program;
- the precision pass is ``precision.add_fp16_cast_folding``: coremltools'
  own ``add_fp16_cast``, which in addition folds each weight's cast into a
  float16 constant as soon as the weight's last reader is cast, and drops the
  float32 constant there and then; the float32 copy shrinks while the float16
  one grows instead of both being whole at once;
- the traced module is built without random initialisation
  (``tracing.skip_weight_init``): every weight comes from the checkpoint, so
  drawing random ones only cost time and a resident copy.

The program is the one the straightforward path makes: the same passes in
the same order, the same constants under the same names.
"""

from sdbuild.convert.program import convert_traced, conversion_pipeline
from sdbuild.convert.tracing import give_freed_memory_back, skip_weight_init, trace_module

__all__ = ["convert_traced", "conversion_pipeline", "give_freed_memory_back", "skip_weight_init", "trace_module"]
