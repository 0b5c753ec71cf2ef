"""Multifunction packages: several static-shape programs of one model, weights stored once.

Core ML (iOS18 / macOS15 and later) keeps several functions in one
``.mlpackage``; coremltools' ``save_multifunction`` points every constant the
functions share at one blob of the weight file. A resolution's function is
named by its image size (``sdbuild.recipe.function_name``); the first one
given is the package's default, so a client that names no function still
gets a working model.
"""

from __future__ import annotations

from pathlib import Path


def merge_functions(parts: dict[str, Path], package: Path) -> None:
    """Merge single-function packages into the multifunction ``package``.

    ``parts``: function name -> package, in order; the first is the default.
    The merged package's bytes depend on its content alone (``make_reproducible``).
    """
    import coremltools as ct

    from sdbuild.mil.validation import validate_once_per_pipeline
    from sdbuild.mlpackage import make_reproducible

    descriptor = ct.utils.MultiFunctionDescriptor()
    for name, path in parts.items():
        descriptor.add_function(str(path), src_function_name="main", target_function_name=name)
    descriptor.default_function_name = next(iter(parts))
    with validate_once_per_pipeline():
        ct.utils.save_multifunction(descriptor, str(package))
    make_reproducible(package)


def function_names(package: Path) -> list[str]:
    """The functions a package declares, default first; [] for a single-function package."""
    from sdbuild.mlpackage import load_spec

    description = load_spec(package).description
    names = [f.name for f in description.functions]
    default = description.defaultFunctionName
    return sorted(names, key=lambda n: n != default)


def share_weights_across_functions(default: str = ""):
    """A graph pass that makes equal constants of different functions one blob again (after compression);
    ``default``: the package's default function, which coremltools' reader does not carry into the program."""
    from coremltools.converters.mil.mil.passes.defs.cleanup.const_deduplication import const_deduplication
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass

    class _ShareAcrossFunctions(AbstractGraphPass):
        def apply(self, prog):
            if len(prog.functions) > 1:
                prog.default_function_name = default
                const_deduplication()._deduplicate_const_across_functions(prog)

    return _ShareAcrossFunctions()
