"""Immutable records as named tuples that compare the way frozen dataclasses do.

Every agent builds the protocol's message and effect classes at each start.
Python 3.11 builds a frozen dataclass by compiling six generated methods, one
``exec`` each; a named tuple takes one, for its ``__new__`` (docs/footprint.md
has the figures).  A named tuple is also quicker to construct, which every
decoded datagram does several times.

A module that defines many of them leaves out ``from __future__ import
annotations``: typing.NamedTuple turns each string annotation into a
ForwardRef, compiling it too.

What a named tuple does that the dataclass did not is compare equal to any
tuple with the same items: a Suspect to the Dead of the same member and
incarnation, a Ping to a plain ``(seq, target, source)``.
:func:`same_class_equality` keeps equality within a class, as the dataclasses
had it; tests/test_frozen.py pins that, the records' immutability and the
field order the decoders rely on.
"""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T", bound=tuple[Any, ...])


def _eq(self: tuple[Any, ...], other: object) -> bool:
    # False rather than NotImplemented for another class: Python would then ask
    # tuple.__eq__, which says yes to a plain tuple with the same items.
    return type(other) is type(self) and tuple.__eq__(self, other) is True


def _ne(self: tuple[Any, ...], other: object) -> bool:
    return not _eq(self, other)


def same_class_equality(cls: type[T]) -> type[T]:
    """Class decorator for a named tuple: equal only to an instance of the same class with equal fields.

    (A decorator because mypy would take an assignment in the class body for
    a field.)  The hash stays the tuple's, so equal records hash alike.
    """
    setattr(cls, "__eq__", _eq)  # noqa: B010
    setattr(cls, "__ne__", _ne)  # noqa: B010
    return cls
