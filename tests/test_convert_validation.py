"""coremltools' program check runs once per pass pipeline, and the package is the same bytes as with a check after every pass."""

from __future__ import annotations

import hashlib

import pytest

from sdbuild.mil.validation import validate_once_per_pipeline


def _tiny_program():
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(4, 8, 3, padding=1)
            self.b = torch.nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(torch.nn.functional.silu(self.a(x))).softmax(1)

    torch.manual_seed(0)
    return torch.jit.trace(Net().eval(), torch.zeros(1, 4, 8, 8))


def _convert(traced, path):
    import coremltools as ct

    from sdbuild.mlpackage import CONVERSION_DATE, make_reproducible

    mlmodel = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=(1, 4, 8, 8))], convert_to="mlprogram",
                         minimum_deployment_target=ct.target.macOS14, skip_model_load=True)
    mlmodel.user_defined_metadata.pop(CONVERSION_DATE, None)
    mlmodel.save(str(path))
    make_reproducible(path)
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def test_same_package_bytes_and_one_check_per_pipeline(tmp_path, monkeypatch):
    from coremltools.converters.mil.mil.program import Program

    traced = _tiny_program()
    calls = []
    original = Program.validate
    monkeypatch.setattr(Program, "validate", lambda self, *a, **k: (calls.append(1), original(self, *a, **k))[1])
    every_pass = _convert(traced, tmp_path / "every.mlpackage")
    per_pass = len(calls)
    calls.clear()
    with validate_once_per_pipeline():
        once = _convert(traced, tmp_path / "once.mlpackage")
    assert once == every_pass
    # ct.convert runs three pipelines (frontend, default, backend) and checks a few times outside them.
    assert 3 <= len(calls) <= 8 and len(calls) * 10 < per_pass, (len(calls), per_pass)


def test_a_broken_program_still_fails_the_pipeline(monkeypatch):
    """A pass that leaves the program invalid is still caught, at the pipeline's end."""
    import coremltools as ct
    from coremltools.converters.mil.mil.program import Program

    seen = []

    def broken(self, *args, **kwargs):
        seen.append(1)
        raise ValueError("Var x not visible in the block main.")

    traced = _tiny_program()
    monkeypatch.setattr(Program, "validate", broken)  # as if the check found the program broken
    with pytest.raises(ValueError, match="not visible"):
        with validate_once_per_pipeline():
            ct.convert(traced, inputs=[ct.TensorType(name="x", shape=(1, 4, 8, 8))], convert_to="mlprogram", skip_model_load=True)
    assert len(seen) == 1  # not before the pipeline, not after each pass: once, at its end


@pytest.mark.parametrize("level", ["WARNING", "DEBUG"])
def test_programs_are_printed_for_the_debug_log_only(monkeypatch, tmp_path, level):
    """The pipelines' debug lines format the whole program: only when the logger would write them."""
    import logging

    from coremltools.converters.mil.mil import Program

    printed = []
    original = Program.__str__

    def counted(self, *args, **kwargs):
        printed.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Program, "__str__", counted)
    logger = logging.getLogger("coremltools")
    before = logger.level
    logger.setLevel(level)
    try:
        with validate_once_per_pipeline():
            _convert(_tiny_program(), tmp_path / "model.mlpackage")
    finally:
        logger.setLevel(before)
    # Before and after each of ct.convert's three pipelines, at DEBUG.
    assert len(printed) >= 6 if level == "DEBUG" else not printed
    assert Program.__dict__["__str__"] is counted  # put back as it was


def _program_with_compressed_weights():
    """A program with what the propagation treats apart: constexpr (palettized) weights, a shape op,
    a tuple input (concat), nested blocks (cond) reading outer vars."""
    import numpy as np
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    rng = np.random.default_rng(0)

    def weight(name):
        # 16 two-bit indices packed in 4 bytes, a 4-entry palette.
        return mb.constexpr_lut_to_dense(
            indices=rng.integers(0, 256, 4).astype(np.uint8), lut=rng.standard_normal(4).astype(np.float16),
            shape=np.array([4, 4], dtype=np.uint32), name=name,
        )

    @mb.program(input_specs=[mb.TensorSpec(shape=(4, 4), dtype=ct.converters.mil.mil.types.fp16)], opset_version=ct.target.iOS16)
    def prog(x):
        a, b = weight("wa"), weight("wb")
        y = mb.matmul(x=x, y=a)
        z = mb.add(x=y, y=b)
        both = mb.concat(values=(y, z, x), axis=0)
        size = mb.shape(x=both)
        pred = mb.greater(x=mb.reduce_sum(x=z), y=np.float16(0))
        picked = mb.cond(pred=pred, _true_fn=lambda: mb.mul(x=z, y=a), _false_fn=lambda: mb.sub(x=x, y=x))
        return mb.add(x=picked, y=mb.cast(x=mb.reduce_sum(x=mb.cast(x=size, dtype="fp16")), dtype="fp16")), both

    return prog


def _all_vars(block):
    for op in block.operations:
        for inner in op.blocks:
            yield from _all_vars(inner)
        yield from op.outputs


def test_nonreplaceable_vars_propagate_to_the_same_sets():
    from coremltools.converters.mil.mil import Block

    from sdbuild.mil.validation import propagate_nonreplaceable_vars

    main = _program_with_compressed_weights().functions["main"]
    Block.__dict__["_propagate_nonreplaceable_vars"](main)  # coremltools' own
    theirs = {v.name: set(v.nonreplaceable_vars_upstream) for v in _all_vars(main)}
    for v in _all_vars(main):
        v._nonreplaceable_vars_upstream = {v}  # whatever was there before is replaced
    propagate_nonreplaceable_vars(main)
    ours = {v.name: v.nonreplaceable_vars_upstream for v in _all_vars(main)}
    assert ours == theirs
    names = {k: sorted(x.name for x in s) for k, s in ours.items()}
    # What the case is made to hold: compressed weights reach the outputs, a shape op stops them,
    # a nested block's op reads an outer weight.
    assert names["wa"] == ["wa"] and set(names[main.outputs[0].name]) == {"wa", "wb"}
    assert any(op.op_type == "shape" and not names[op.outputs[0].name] for op in main.operations)
    assert any(names.get(v.name) for op in main.operations for inner in op.blocks for v in _all_vars(inner))


def test_the_walk_is_left_out_only_where_the_function_has_held_no_constexpr_op(tmp_path, monkeypatch):
    """A conversion from torch makes no constexpr_ op: every set stays empty, and nothing is walked. A
    function holding one is walked at each block's end, to the sets coremltools' own walk gives."""
    from coremltools.converters.mil.mil import Block

    import sdbuild.mil.validation as validation

    walked = []
    ours = validation.propagate_nonreplaceable_vars
    def counted(block):
        walked.append((block.name, sorted({op.op_type for op in block.operations if op.op_type.startswith("constexpr_")})))
        ours(block)

    monkeypatch.setattr(validation, "propagate_nonreplaceable_vars", counted)
    with validate_once_per_pipeline():
        _convert(_tiny_program(), tmp_path / "model.mlpackage")
        assert walked == [], walked[:3]
        main = _program_with_compressed_weights().functions["main"]
    assert walked  # the builder's blocks ended after the first constexpr_ op
    got = {v.name: set(v.nonreplaceable_vars_upstream) for v in _all_vars(main)}
    Block.__dict__["_propagate_nonreplaceable_vars"](main)  # coremltools' own
    assert got == {v.name: set(v.nonreplaceable_vars_upstream) for v in _all_vars(main)}
    assert any(got.values())


def test_type_descriptions_are_made_once_per_class_inside_and_every_time_outside(monkeypatch):
    import sys

    from coremltools.converters.mil.mil import types

    from sdbuild.mil.validation import memoized_type_info

    where = sys.modules["coremltools.converters.mil.mil.types.get_type_info"]
    original = where.get_type_info
    t = types.tensor(types.fp32, (3, 5, 7, 11, 13))  # a class nothing else makes
    made = []
    describe = t.__dict__["__type_info__"].__func__
    monkeypatch.setattr(t, "__type_info__", classmethod(lambda cls: (made.append(cls), describe(cls))[1]))
    assert types.is_tensor(t) and not types.is_list(t)
    assert len(made) == 2
    made.clear()
    with memoized_type_info():
        with memoized_type_info():  # entered again further in: the same memo
            first = types.type_mapping.get_type_info(t)
        assert all(types.is_tensor(t) and not types.is_list(t) for _ in range(5))
        assert types.type_mapping.get_type_info(t) is first and repr(first) == "tensor[3,5,7,11,13,fp32]"
        assert types.is_tensor(types.tensor(types.fp16, (3, 5, 7, 11, 13)))  # another class: described on its own
    assert len(made) == 1
    # Left as it was: every module's name for it is coremltools' function again.
    holders = [m for name, m in sys.modules.items() if name.startswith("coremltools.") and hasattr(m, "get_type_info")]
    assert len(holders) >= 5 and all(m.get_type_info is original for m in holders if callable(m.get_type_info))
    assert types.is_tensor(t) and len(made) == 2


def test_a_package_loads_to_the_same_program_with_described_types_memoized(tmp_path, monkeypatch):
    import contextlib

    import sdbuild.mil.executor as executor

    _convert(_tiny_program(), tmp_path / "model.mlpackage")

    def described(program):
        return [(op.op_type, op.name, [(o.name, repr(o.sym_type)) for o in op.outputs],
                 sorted((k, getattr(v, "name", None)) for k, v in op.inputs.items())) for op in program.function.operations]

    memoized = described(executor.load_program(tmp_path / "model.mlpackage"))
    monkeypatch.setattr(executor, "memoized_type_info", contextlib.nullcontext)
    assert described(executor.load_program(tmp_path / "model.mlpackage")) == memoized
    assert len(memoized) > 5


def test_a_function_found_without_constexpr_is_looked_through_again_only_after_one_goes_in(monkeypatch):
    """Found without a constexpr_ op, a function is not looked through again at each block's end; once
    one goes into it, the next block end walks it to the sets coremltools' own walk gives."""
    import numpy as np
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Block

    import sdbuild.mil.validation as validation

    looked = []
    holds = validation._holds_constexpr
    monkeypatch.setattr(validation, "_holds_constexpr", lambda block: (looked.append(block), holds(block))[1])
    with validate_once_per_pipeline():
        @mb.program(input_specs=[mb.TensorSpec(shape=(4, 4), dtype=ct.converters.mil.mil.types.fp16)], opset_version=ct.target.iOS16)
        def prog(x):
            return mb.relu(x=mb.add(x=x, y=x))

        main = prog.functions["main"]
        assert len(looked) == 1
        for _ in range(5):
            with main:
                mb.mul(x=main.inputs["x"], y=np.float16(2), before_op=main.operations[-1])
        assert len(looked) == 1  # no constexpr_ op went in: not looked through again
        with main:
            relu = main.operations[-1]
            w = mb.constexpr_lut_to_dense(indices=np.arange(4, dtype=np.uint8), lut=np.arange(4, dtype=np.float16),
                                          shape=np.array([4, 4], dtype=np.uint32), name="w", before_op=relu)
            y = mb.add(x=relu.x, y=w, before_op=relu)
            relu.enclosing_block.replace_uses_of_var_after_op(anchor_op=y.op, old_var=relu.x, new_var=y, end_op=relu)
        assert len(looked) == 2
    got = {v.name: {u.name for u in v.nonreplaceable_vars_upstream} for v in _all_vars(main)}
    assert got[main.outputs[0].name] == {"w"}
    Block.__dict__["_propagate_nonreplaceable_vars"](main)  # coremltools' own
    assert got == {v.name: {u.name for u in v.nonreplaceable_vars_upstream} for v in _all_vars(main)}
