"""ML program tooling: the reference executor (``executor``, with its kernel table in ``kernels``).

``load_program`` and ``exec_files`` are re-exported lazily, so importing this
package does not pull in torch and coremltools until they are used.
"""

__all__ = ["load_program", "exec_files"]


def __getattr__(name):
    if name in __all__:
        from sdbuild.mil import executor

        return getattr(executor, name)
    raise AttributeError(f"module 'sdbuild.mil' has no attribute {name!r}")
