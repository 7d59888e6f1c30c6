"""Request bodies typed by people, checked strictly against their schema before sending.

Services ignore fields they do not know (the evolution rule: an older peer skips what a newer one
adds), so a misspelt or foreign field (`resources.nano_cpus`, `owner_id`) would be dropped without a
word. baaaht-ctl refuses it instead, naming its path; `--loose` sends the body as written.
"""

from __future__ import annotations

from typing import Any, Iterator

import msgspec
import msgspec.inspect as mi

from baaaht.ctl.common import fail

_SEQUENCES = (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)


def unknown_fields(value: Any, schema: type, root: str = "$") -> list[str]:
    """The path of every key in `value` (JSON-like data) that `schema` has no field for."""
    return list(_walk(value, mi.type_info(schema), root))


def _walk(value: Any, info: mi.Type, path: str) -> Iterator[str]:
    if isinstance(info, mi.UnionType):  # Optional[X], or tagged structs told apart by their tag
        yield from _walk(value, _member_for(value, info), path)
    elif isinstance(info, mi.StructType) and not info.array_like and isinstance(value, dict):
        fields = {f.encode_name: f for f in info.fields}
        for key, item in value.items():
            if key == info.tag_field:
                continue
            found = fields.get(key)
            if found is None:
                yield f"{path}.{key}"
            else:
                yield from _walk(item, found.type, f"{path}.{key}")
    elif isinstance(info, _SEQUENCES) and isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, info.item_type, f"{path}[{index}]")
    elif isinstance(info, mi.DictType) and isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, info.value_type, f"{path}.{key}")


def _member_for(value: Any, union: mi.UnionType) -> mi.Type:
    structs = [t for t in union.types if isinstance(t, mi.StructType)]
    if isinstance(value, dict):
        for member in structs:
            if member.tag_field and value.get(member.tag_field) == member.tag:
                return member
    containers = [t for t in union.types if not isinstance(t, (mi.NoneType, mi.AnyType))]
    return containers[0] if len(containers) == 1 else mi.AnyType()


def check(raw: Any, schema: type, what: str, loose: bool, root: str = "$") -> None:
    """Refuse fields `schema` does not know, unless `loose`."""
    unknown = [] if loose else unknown_fields(raw, schema, root)
    if unknown:
        fail(
            f"invalid {what}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"(`baaaht-ctl schema {what}` lists the fields; --loose sends it anyway)"
        )


def parse(text: str, what: str) -> Any:
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        fail(f"invalid {what}: not JSON: {exc}")


def decode(text: str, schema: type, what: str, loose: bool) -> Any:
    """The body as a `schema` instance, after the strict check; a wrong type names the field too."""
    check(parse(text, what), schema, what, loose)
    try:
        return msgspec.json.decode(text, type=schema)
    except msgspec.ValidationError as exc:
        fail(f"invalid {what}: {exc}")


def encode(text: str, schema: type | None, what: str, loose: bool) -> bytes:
    """The msgpack body to send. With `--loose` it is the body as written (a newer service may know the
    extra fields); a target without a known schema is sent as written."""
    if schema is None:
        return msgspec.msgpack.encode(parse(text, what))
    typed = decode(text, schema, what, loose)
    return msgspec.msgpack.encode(parse(text, what) if loose else typed)
