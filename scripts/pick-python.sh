#!/bin/sh
# The interpreter `make install` makes the venv with (Makefile: PYTHON ?= $(shell sh scripts/pick-python.sh)).
#
# Of the CPython interpreters here with python3's own version (the one the torch wheel on disk is
# for), the first with libpython linked into its executable; python3 where none is. An interpreter
# built with --enable-shared (pyenv's default build) calls into a shared libpython through the
# PLT and runs Python code markedly slower; `make test` is mostly Python (coremltools' graph
# passes). Measured on the 2-core machine (bench/results/python-s16.json): the same suite,
# same results, 12-21% less CPU. On a machine without /proc (macOS) this is python3.
set -u
version=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || { echo python3; exit 0; }
for candidate in python3 "python$version" "/usr/bin/python$version" "/usr/local/bin/python$version"; do
    command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" - "$version" 2>/dev/null <<'EOF'
import sys
import ensurepip, venv  # noqa: F401  (make install makes a venv with pip)
wanted = sys.argv[1]
with open("/proc/self/maps") as maps:
    shared = any("libpython" in line for line in maps)
sys.exit(0 if "%d.%d" % sys.version_info[:2] == wanted and sys.implementation.name == "cpython" and not shared else 1)
EOF
    then
        echo "$candidate"
        exit 0
    fi
done
echo python3
