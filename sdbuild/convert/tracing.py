"""Building and tracing a component without filling weights twice."""

from __future__ import annotations

import contextlib

import torch

# torch.nn.init functions that fill a fresh parameter; each returns its tensor.
_INIT_FUNCTIONS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "zeros_", "ones_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)  # fmt: skip


@contextlib.contextmanager
def skip_weight_init():
    """Within: modules are built without filling their parameters (torch.nn.init does nothing).

    For modules whose every parameter is then loaded from a checkpoint, as
    ``build_component`` checks for sdbuild's modules: the random values would
    be overwritten, and drawing them costs time and makes a whole extra copy of
    the weights resident (an untouched ``torch.empty`` never becomes resident).
    """
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(torch.nn.init, name, _leave_as_is)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def _leave_as_is(tensor, *args, **kwargs):
    return tensor


def trace_module(module, example: list) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of ``module`` on the ``example`` tensors, without autograd state."""
    with torch.no_grad():
        return torch.jit.trace(module, example, strict=False, check_trace=False)
