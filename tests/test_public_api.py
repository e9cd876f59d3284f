"""The public API as a new user meets it: a fresh interpreter, every name in ``selfprune.__all__``."""
from __future__ import annotations

import subprocess
import sys


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_every_public_name_resolves_in_a_fresh_interpreter():
    """Each name alone, in its own interpreter (the order of first access must not matter), then all of them
    through ``from selfprune import *``; none is shadowed by a submodule of the same name (a lazy attribute and
    a submodule sharing a name recursed forever)."""
    import importlib.util

    import selfprune

    for name in selfprune.__all__:
        assert importlib.util.find_spec(f"selfprune.{name}") is None, f"selfprune.{name} is also a submodule"
        done = _fresh(f"import selfprune\nvalue = selfprune.{name}\nassert value is not None\nprint(type(value).__name__)")
        assert done.returncode == 0, (name, done.stderr[-1500:])
    done = _fresh("from selfprune import *\nimport selfprune\n"
                  "missing = [n for n in selfprune.__all__ if n not in globals()]\nassert not missing, missing\n"
                  "assert callable(perplexity) and isinstance(PerplexityEvaluator, type)\nprint('OK')")
    assert done.returncode == 0 and done.stdout.strip() == "OK", done.stderr[-1500:]


def test_an_unknown_name_is_an_attribute_error():
    done = _fresh("import selfprune\ntry:\n    selfprune.no_such_name\nexcept AttributeError as exc:\n"
                  "    print('AttributeError', exc)")
    assert done.returncode == 0 and done.stdout.startswith("AttributeError"), done.stderr[-800:]
