"""User-facing errors: one line that names what is wrong and how to fix it."""
from __future__ import annotations

import re

_OPTION = re.compile(r"\{option:([a-z_]+)(?:\|(--[a-z0-9-]+))?\}")


def option(name: str, flag: str | None = None) -> str:
    """Name a setting inside an error message so each interface spells it its own way: ``data_dir=`` for a
    Python caller, ``--data-dir`` on the command line (or ``flag`` where the CLI's name differs, as
    ``base_url`` is ``--llm-base-url``)."""
    return f"{{option:{name}|{flag}}}" if flag else f"{{option:{name}}}"


class SelfpruneError(Exception):
    """Raised for bad input; the CLI prints ``cli_message()`` as a single line and exits with status 2."""

    def _text(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        return _OPTION.sub(lambda m: f"{m.group(1)}=", self._text())

    def cli_message(self) -> str:
        return _OPTION.sub(lambda m: m.group(2) or "--" + m.group(1).replace("_", "-"), self._text())


def is_real(value) -> bool:
    """A real number as the API takes one: ints, floats, numpy scalars; not booleans, strings or tensors."""
    import numbers

    return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def is_whole(value, low: int | None = None) -> bool:
    """A finite real number with no fraction (``4``, ``4.0``, ``np.int64(4)``), at least ``low`` when given."""
    import math

    return (is_real(value) and math.isfinite(value) and value == int(value)
            and (low is None or int(value) >= low))


def check_whole(label: str, value, low: int = 1, example: int = 128) -> int:
    """``value`` as a whole number >= ``low``, or a SelfpruneError naming the setting (``label``: ``option(...)``)."""
    if not is_whole(value, low):
        what = "a positive whole number" if low == 1 else f"a whole number >= {low}"
        raise SelfpruneError(f"{label} {value!r} must be {what}: e.g. {example}")
    return int(value)
