"""Building and tracing a component without filling weights twice, or attention weights at all."""

from __future__ import annotations

import contextlib
import warnings

import torch

# glibc's mallopt parameter for the size from which an allocation gets its own mapping.
_M_MMAP_THRESHOLD = -3
_OWN_MAPPING_FROM = 1 << 20


def give_freed_memory_back() -> None:
    """From now on in this process, every allocation from 1 MiB up is its own mapping, unmapped when freed (glibc).

    glibc otherwise raises that threshold to the largest block freed so far (up
    to 32 MiB), after which a model's activations come from the heap, whose
    freed holes stay resident. Tracing SDXL's unet at 1024×1024 peaked at
    16.1 GiB that way, 10.8 GiB with the threshold fixed; SD 1.5's 4.8 and
    3.7 GiB. It costs page faults (about a third more CPU time in SD 1.5's
    trace), so the trace stage asks for it, not every stage. Elsewhere (macOS's
    allocator) nothing changes.
    """
    import ctypes

    # The symbols this process already has (its C library's among them), not ctypes.util.find_library:
    # that runs ldconfig in a child process, forked with this process's pages, and a stage's peak adds
    # its children's (RUSAGE_CHILDREN): the fork alone added 0.37 GiB to a forked verify's figure.
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        libc = None
    if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version"):
        libc.mallopt(_M_MMAP_THRESHOLD, _OWN_MAPPING_FROM)


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


@contextlib.contextmanager
def unfilled_attention_weights():
    """Within: CPU ``bmm`` and ``softmax`` return tensors of the right shape and dtype, never computed.

    A trace records which ops run on which values, not what the values are,
    and no sdbuild module branches on a value. The ops that matter for memory
    are attention's: with ORIGINAL attention, SD 1.5's first transformer holds
    (2, 8, 4096, 4096) float32 scores and as large a softmax, 2.1 GB on top of
    the weights. Left unfilled, those tensors never become resident (fresh
    pages are backed only once written), and the trace is the same graph:
    ``torch.jit.trace`` records ``aten::matmul``, ``aten::einsum`` and
    ``aten::softmax`` above the CPU kernels replaced here (a test compares the
    graphs and runs the saved module). Everything after an attention is then
    computed on garbage, which a trace does not look at.
    """

    def bmm(a, b):
        return torch.empty((a.shape[0], a.shape[1], b.shape[2]), dtype=a.dtype)

    def softmax(x, dim, half_to_float):
        return torch.empty(x.shape, dtype=torch.float32 if half_to_float else x.dtype)

    with warnings.catch_warnings():
        # torch warns that a registered kernel is being overridden: that is the point, until the exit.
        warnings.simplefilter("ignore", UserWarning)
        library = torch.library.Library("aten", "IMPL")
        library.impl("bmm", bmm, "CPU")
        library.impl("_softmax", softmax, "CPU")
    try:
        yield
    finally:
        library._destroy()  # the built-in kernels again


def trace_module(module, example: list) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of ``module`` on the ``example`` tensors, without autograd state or attention values."""
    with torch.no_grad(), unfilled_attention_weights():
        return torch.jit.trace(module, example, strict=False, check_trace=False)
