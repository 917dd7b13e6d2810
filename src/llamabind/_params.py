"""Set fields of llama.cpp parameter structs from keyword arguments, checked against the struct."""

from __future__ import annotations

from typing import Any

from .raw import ffi


def _enum_value(ctype: Any, field: str, value: Any) -> int:
    """Accept an enum member as int or as its short name: ``"mean"`` for LLAMA_POOLING_TYPE_MEAN."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value not in ctype.elements:
            raise ValueError(f"{field}: {value} is not a valid {ctype.cname}")
        return value
    if isinstance(value, str):
        suffix = "_" + value.upper()
        for name, number in ctype.relements.items():
            if name.endswith(suffix) or name == value.upper():
                return number
    names = sorted({n.rsplit("_", 1)[-1].lower() for n in ctype.relements})
    raise ValueError(f"{field}: {value!r} is not one of {', '.join(names)}")


def apply(params: Any, struct: str, values: dict[str, Any]) -> None:
    """Assign ``values`` to the fields of ``params`` (a cdata ``struct``); unknown names raise TypeError.

    Pointer fields are refused: they are set by llamabind itself where it is safe to do so.
    """
    fields = dict(ffi.typeof(struct).fields)
    for key, value in values.items():
        if key not in fields:
            raise TypeError(f"unknown {struct} field {key!r}; known: {', '.join(sorted(fields))}")
        ctype = fields[key].type
        if ctype.kind in ("pointer", "function"):
            raise TypeError(f"{struct}.{key} is a pointer and cannot be set from Python here")
        if ctype.kind == "enum":
            value = _enum_value(ctype, key, value)
        try:
            setattr(params, key, value)
        except (TypeError, OverflowError) as e:
            raise ValueError(f"{struct}.{key}: {value!r} does not fit {ctype.cname}") from e
