"""JSON Schema (and tool-call formats) compiled into the node graph that
:mod:`._structured_automaton` walks byte by byte.

Only what can be *enforced* while generating is accepted; a schema using a validation
keyword this compiler cannot enforce (``pattern``, numeric bounds other than
``minimum: 0``, ``uniqueItems``, ``not``...) is refused with :class:`SchemaError` (the
server answers 400) rather than silently producing output that may not validate.
Annotations (``title``, ``description``, ``default``, ``examples``, ``format``...) and
unknown keywords are ignored, as validators ignore them.

Where the schema leaves a choice open, the compiler may choose a subset of valid outputs:
an object with ``properties`` and no ``additionalProperties`` only gets its declared
properties; generated text is always valid, it need not reach every valid document.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ANY",
    "Arr",
    "Compiler",
    "Lit",
    "Num",
    "Obj",
    "Rep",
    "SchemaError",
    "Seq",
    "Str",
    "Union",
]


class SchemaError(ValueError):
    """A schema this server cannot enforce (or that no value satisfies)."""


@dataclass(frozen=True)
class AnyValue:
    """Any JSON value (nesting bounded by the automaton)."""


@dataclass(frozen=True)
class Obj:
    props: dict[bytes, int]  # JSON-escaped key body -> node id
    required: frozenset[bytes]
    additional: int | None  # node id for undeclared keys, None: none allowed

    def __hash__(self) -> int:
        return id(self)


@dataclass(frozen=True)
class Arr:
    items: int
    min_items: int = 0
    max_items: int | None = None


@dataclass(frozen=True)
class Str:
    min_length: int = 0
    max_length: int | None = None


@dataclass(frozen=True)
class Num:
    integer: bool = False
    nonneg: bool = False


@dataclass(frozen=True)
class Lit:
    options: tuple[bytes, ...]


@dataclass(frozen=True)
class Union:
    options: tuple[int, ...]


@dataclass(frozen=True)
class Seq:
    parts: tuple[int, ...]


@dataclass(frozen=True)
class Rep:
    item: int
    sep: int | None
    min_count: int = 1
    max_count: int | None = None


ANY = 0  # node id of AnyValue in every compiler
FREE_STRING = 1  # node id of an unconstrained string (keys of free-form objects)

_ANNOTATIONS = {
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "format",
    "deprecated", "readOnly", "writeOnly", "discriminator", "$defs", "definitions",
    "contentMediaType", "contentEncoding", "strict", "additionalItems",
}  # fmt: skip
_UNSUPPORTED = {
    "pattern", "patternProperties", "propertyNames", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "multipleOf", "not", "if", "then", "else", "dependentRequired",
    "dependentSchemas", "dependencies", "unevaluatedProperties", "unevaluatedItems",
    "prefixItems", "contains", "minContains", "maxContains", "minProperties",
    "maxProperties", "$dynamicRef", "$anchor",
}  # fmt: skip
_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


def _dump(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _key(name: str) -> bytes:
    return _dump(name)[1:-1]


def _type_of(value: Any) -> set[str]:
    if value is None:
        return {"null"}
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int):
        return {"integer", "number"}
    if isinstance(value, float):
        return {"number", "integer"} if value.is_integer() else {"number"}
    if isinstance(value, str):
        return {"string"}
    if isinstance(value, list):
        return {"array"}
    return {"object"}


class Compiler:
    """Builds the node table; ``nodes[i]`` is the node with id ``i``."""

    def __init__(self) -> None:
        self.nodes: list[Any] = [AnyValue(), Str()]
        self._refs: dict[str, int] = {}
        self._root: Any = None
        self._depth = 0

    def add(self, node: Any) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    # --- formats (tool calls) -----------------------------------------------------------
    def literal(self, text: str) -> int:
        return self.add(Lit((text.encode("utf-8"),)))

    def sequence(self, parts: list[int]) -> int:
        return self.add(Seq(tuple(parts)))

    def repeat(
        self, item: int, *, sep: int | None, min_count: int = 1, max_count: int | None = None
    ) -> int:
        return self.add(Rep(item, sep, min_count, max_count))

    def union(self, options: list[int]) -> int:
        return options[0] if len(options) == 1 else self.add(Union(tuple(options)))

    # --- JSON Schema --------------------------------------------------------------------
    def schema(self, schema: Any) -> int:
        """Compile a JSON Schema document (the root for ``$ref`` resolution)."""
        self._root = schema
        return self._compile(schema)

    def _compile(self, schema: Any) -> int:
        self._depth += 1
        try:
            if self._depth > 64:
                raise SchemaError("schema nests too deeply")
            return self._compile_inner(schema)
        finally:
            self._depth -= 1

    def _compile_inner(self, schema: Any) -> int:
        if schema is True:
            return ANY
        if schema is False:
            raise SchemaError("the schema `false` matches nothing")
        if not isinstance(schema, dict):
            raise SchemaError(
                f"a schema must be an object or a boolean, got {type(schema).__name__}"
            )
        bad = sorted(k for k in schema if k in _UNSUPPORTED)
        if bad:
            raise SchemaError(f"JSON schema keyword {bad[0]!r} cannot be enforced by this server")
        if "$ref" in schema:
            return self._ref(schema["$ref"])
        node = self._compile_core(schema)
        if schema.get("nullable") is True:
            node = self.union([node, self.add(Lit((b"null",)))])
        return node

    def _ref(self, ref: Any) -> int:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError(f"only local $ref ('#/...') is supported, got {ref!r}")
        if ref in self._refs:
            return self._refs[ref]
        target: Any = self._root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise SchemaError(f"$ref {ref!r} does not resolve")
        # Reserve the id first so recursive schemas refer back to it.
        slot = self.add(None)
        self._refs[ref] = slot
        compiled = self._compile(target)
        self.nodes[slot] = Union((compiled,))
        return slot

    def _compile_core(self, schema: dict[str, Any]) -> int:
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else schema["enum"]
            if not isinstance(values, list):
                raise SchemaError("enum must be a list")
            wanted = self._types(schema)
            if wanted is not None:
                values = [v for v in values if _type_of(v) & wanted]
            literals = tuple(dict.fromkeys(_dump(v) for v in values))
            if not literals:
                raise SchemaError("enum/const leaves no allowed value")
            return self.add(Lit(literals))
        for key in ("anyOf", "oneOf", "allOf"):
            if key in schema:
                return self._combinator(key, schema)
        wanted = self._types(schema)
        if wanted is None:
            wanted = self._implied_types(schema)
        if wanted is None:
            return ANY
        options = [self._typed(t, schema) for t in _TYPES if t in wanted]
        if "integer" in wanted and "number" in wanted:
            options = [self._typed(t, schema) for t in _TYPES if t in wanted and t != "integer"]
        return self.union(options)

    def _types(self, schema: dict[str, Any]) -> set[str] | None:
        if "type" not in schema:
            return None
        t = schema["type"]
        names = [t] if isinstance(t, str) else t
        if not isinstance(names, list) or not names or any(n not in _TYPES for n in names):
            raise SchemaError(f"invalid type {t!r}")
        return set(names)

    def _implied_types(self, schema: dict[str, Any]) -> set[str] | None:
        if any(k in schema for k in ("properties", "required", "additionalProperties")):
            return {"object"}
        if any(k in schema for k in ("items", "minItems", "maxItems")):
            return {"array"}
        if any(k in schema for k in ("minLength", "maxLength")):
            return {"string"}
        return None

    def _combinator(self, key: str, schema: dict[str, Any]) -> int:
        branches = schema[key]
        if not isinstance(branches, list) or not branches:
            raise SchemaError(f"{key} must be a non-empty list")
        siblings = [k for k in schema if k not in _ANNOTATIONS and k not in (key, "nullable")]
        if siblings:
            raise SchemaError(f"{key} combined with {siblings[0]!r} cannot be enforced")
        if key == "allOf":
            if len(branches) != 1:
                raise SchemaError("allOf with several schemas cannot be enforced")
            return self._compile(branches[0])
        compiled = [self._compile(b) for b in branches]
        if key == "oneOf" and len(compiled) > 1:
            kinds = [self._kinds(n, set()) for n in compiled]
            for i in range(len(kinds)):
                for j in range(i + 1, len(kinds)):
                    if kinds[i] & kinds[j]:
                        raise SchemaError(
                            "oneOf branches that can match the same value cannot be enforced"
                        )
        return self.union(compiled)

    def _kinds(self, node_id: int, seen: set[int]) -> set[Any]:
        """What values a node can produce, coarsely: JSON types, or literal values."""
        if node_id in seen:
            return set()
        seen.add(node_id)
        node = self.nodes[node_id]
        if isinstance(node, Union):
            out: set[Any] = set()
            for opt in node.options:
                out |= self._kinds(opt, seen)
            return out
        if isinstance(node, Lit):
            return {("lit", o) for o in node.options} | {
                t for o in node.options for t in _type_of(json.loads(o)) if t in ("object", "array")
            }
        if isinstance(node, AnyValue):
            return set(_TYPES) | {("lit", b"true"), ("lit", b"false"), ("lit", b"null")}
        if isinstance(node, Obj):
            return {"object"}
        if isinstance(node, Arr):
            return {"array"}
        if isinstance(node, Str):
            return {"string"}
        if isinstance(node, Num):
            return {"number"}
        return {"other"}

    def _typed(self, kind: str, schema: dict[str, Any]) -> int:
        if kind == "null":
            return self.add(Lit((b"null",)))
        if kind == "boolean":
            return self.add(Lit((b"true", b"false")))
        if kind in ("number", "integer"):
            minimum = schema.get("minimum")
            if minimum is not None and minimum != 0:
                raise SchemaError("numeric bounds other than minimum: 0 cannot be enforced")
            return self.add(Num(integer=kind == "integer", nonneg=minimum == 0))
        if kind == "string":
            lo, hi = schema.get("minLength", 0), schema.get("maxLength")
            if not isinstance(lo, int) or (hi is not None and not isinstance(hi, int)):
                raise SchemaError("minLength/maxLength must be integers")
            if hi is not None and hi < lo:
                raise SchemaError("maxLength is below minLength")
            return self.add(Str(lo, hi))
        if kind == "array":
            return self._array(schema)
        return self._object(schema)

    def _array(self, schema: dict[str, Any]) -> int:
        if schema.get("uniqueItems") is True:
            raise SchemaError("uniqueItems cannot be enforced by this server")
        items = schema.get("items", True)
        if isinstance(items, list):
            raise SchemaError("tuple-style items (a list) cannot be enforced")
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        if not isinstance(lo, int) or (hi is not None and not isinstance(hi, int)):
            raise SchemaError("minItems/maxItems must be integers")
        if hi is not None and hi < lo:
            raise SchemaError("maxItems is below minItems")
        slot = self.add(None)
        self.nodes[slot] = Arr(self._compile(items), lo, hi)
        return slot

    def _object(self, schema: dict[str, Any]) -> int:
        props = schema.get("properties", {})
        required = schema.get("required", [])
        if not isinstance(props, dict) or not isinstance(required, list):
            raise SchemaError("properties must be an object and required a list")
        additional = schema.get("additionalProperties", None if props else True)
        slot = self.add(None)
        compiled = {_key(name): self._compile(sub) for name, sub in props.items()}
        extra = None
        if additional is True:
            extra = ANY
        elif isinstance(additional, dict):
            extra = self._compile(additional)
        elif additional not in (False, None):
            raise SchemaError("additionalProperties must be a boolean or a schema")
        keys = frozenset(_key(str(r)) for r in required)
        missing = [k for k in keys if k not in compiled]
        if missing:
            if extra is None:
                raise SchemaError(f"required property {missing[0].decode()!r} is not allowed")
            for k in missing:
                compiled[k] = extra
        self.nodes[slot] = Obj(compiled, keys, extra)
        return slot
