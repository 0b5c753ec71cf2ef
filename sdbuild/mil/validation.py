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

And it recomputes each block's non-replaceable vars (what a var may not be
replaced by, from the ``constexpr_`` ops upstream of it) in one loop over the
ops (``_propagate_nonreplaceable_vars``) instead of three method calls, a
property check and a dict per var: the same sets, half the time. coremltools
walks the whole block again each time a ``with block:`` ends (about 110 times
a conversion or compression, every pass opens one): 18 % of a tiny unet's
conversion before, and as much of its compression. Where the function has
never held a ``constexpr_`` op every set is empty, and the walk is skipped.

``memoized_type_info`` (also inside a pipeline, and while a package loads)
answers coremltools' type questions (``get_type_info``: is this a tensor, a
list?) once per type class instead of building a new description each time.
"""

from __future__ import annotations

import logging
import sys
import weakref
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
        with _propagated_in_one_loop(), memoized_type_info():
            yield
    finally:
        Program.validate = validate
        PassPipelineManager.apply_pipeline = apply_pipeline


@contextmanager
def memoized_type_info():
    """Within: coremltools' ``get_type_info`` gives each type class's description once and then
    the same one again.

    A description (``types.type_spec.Type``) is a function of its class alone (a tensor's
    dtype and shape, a list's element type: fixed when the class is made) and nobody
    changes one, yet ``is_tensor`` and ``is_list`` build a new one, with its element's,
    for every question: a fifth of loading the tiny unet's package (cProfile), a tenth of the
    test suite's conversions (py-spy). Anything
    other than a class (a method's signature) is described afresh, as before.
    """
    import coremltools.converters.mil.mil.types.get_type_info  # noqa: F401 (the package's name is the function's)

    describe = sys.modules["coremltools.converters.mil.mil.types.get_type_info"].get_type_info
    if getattr(describe, "memoized", False):  # entered already, further out
        yield
        return
    known: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get_type_info(t):
        if not isinstance(t, type):
            return describe(t)
        try:
            return known[t]
        except KeyError:
            info = known[t] = describe(t)
            return info

    get_type_info.memoized = True
    # Each types module imported the function by name: each one's name is pointed at the memo.
    holders = [m for name, m in list(sys.modules.items())
               if name.startswith("coremltools.") and getattr(m, "get_type_info", None) is describe]
    for module in holders:
        module.get_type_info = get_type_info
    try:
        yield
    finally:
        for module in holders:
            module.get_type_info = describe


@contextmanager
def _propagated_in_one_loop():
    """``Block._propagate_nonreplaceable_vars`` as ``propagate_nonreplaceable_vars``, and not at all
    in a function that has held no ``constexpr_`` op yet.

    A var's set comes only from ``constexpr_`` ops upstream of it: in a function that has never
    held one (a conversion from torch; a compression until its pass makes the first) every set is
    empty, as each var was made, and the walk would leave them so. Looking for one such op is a
    quarter of the walk, so a function found without one is not looked through again until a
    ``constexpr_`` op has gone into a block (``Block._insert_op_before``, where every new op goes in).
    Once one is seen in a function, every later exit walks it, as coremltools does.
    """
    from coremltools.converters.mil.mil import Block, Function

    saved = Block.__dict__["_propagate_nonreplaceable_vars"]
    insert = Block.__dict__["_insert_op_before"]
    seen: set[int] = set()  # id() of each function that has held a constexpr_ op (a reused id only walks more)
    inserted = [0]  # constexpr_ ops put into a block so far
    without: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # function -> `inserted` when found without one

    def insert_op_before(block, new_op, *args, **kwargs):
        if new_op.op_type.startswith("constexpr_"):
            inserted[0] += 1
        return insert(block, new_op, *args, **kwargs)

    def propagate(block) -> None:
        function = block
        while function.outer_op is not None:
            function = function.outer_op.enclosing_block
        if id(function) not in seen:
            if isinstance(function, Function) and without.get(function) == inserted[0]:
                return
            if not _holds_constexpr(function):
                if isinstance(function, Function):  # a bare Block cannot be held weakly: looked through each time
                    without[function] = inserted[0]
                return
            seen.add(id(function))
        propagate_nonreplaceable_vars(block)

    Block._propagate_nonreplaceable_vars = propagate
    Block._insert_op_before = insert_op_before
    try:
        yield
    finally:
        Block._propagate_nonreplaceable_vars = saved
        Block._insert_op_before = insert


def _holds_constexpr(block) -> bool:
    for op in block.operations:
        if op.op_type.startswith("constexpr_") or (op.blocks and any(_holds_constexpr(inner) for inner in op.blocks)):
            return True
    return False


def propagate_nonreplaceable_vars(block) -> None:
    """What coremltools' ``Block._propagate_nonreplaceable_vars`` sets, set op by op.

    Each output of each op of ``block`` (nested blocks first, program order)
    gets its set: empty for a ``shape``, itself for a ``constexpr_`` op, else
    the union of its op's inputs' sets (inputs as ``Operation.get_flattened_inputs``
    lists them); where one input's set is the only one not empty, that very set
    (a var downstream of compressed weights holds them all: copying it for each
    var was most of the time in a compression). An output whose ``op`` is not
    the op that lists it (never seen) goes through coremltools' own two calls.
    """
    from coremltools.converters.mil.mil.var import InternalVar

    for op in block.operations:
        for inner in op.blocks:
            propagate_nonreplaceable_vars(inner)
        outputs = op._output_vars
        if outputs is None:
            continue
        kind = op.op_type
        upstream = None
        if kind != "shape" and not kind.startswith("constexpr_"):
            upstream = []  # the inputs' sets that are not empty
            for value in op._input_vars.values():
                if isinstance(value, (list, tuple)):
                    upstream.extend(v._nonreplaceable_vars_upstream for v in value if v._nonreplaceable_vars_upstream)
                elif value is not None and not isinstance(value, InternalVar) and value._nonreplaceable_vars_upstream:
                    upstream.append(value._nonreplaceable_vars_upstream)
        for out in outputs:
            if out._op is not op:
                out._reset_nonreplaceable_vars_upstream()
                out._set_nonreplaceable_vars_upstream()
            elif upstream is None:
                out._nonreplaceable_vars_upstream = set() if kind == "shape" else {out}
            elif len(upstream) == 1:
                # coremltools replaces these sets, never changes one in place: the input's own will do.
                out._nonreplaceable_vars_upstream = upstream[0]
            else:
                out._nonreplaceable_vars_upstream = set().union(*upstream)


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
