"""Hypothesis strategies shared by the tests."""

from __future__ import annotations

from hypothesis import strategies as st

from hwbkptd._cond import NAMES

__all__ = ["BINARY", "conditions"]

BINARY = ("==", "!=", "<", "<=", ">", ">=", "&", "|", "^", "<<", ">>", "+", "-", "and", "or")


def _literal(length: int) -> st.SearchStrategy[str]:
    top = (1 << (8 * length)) - 1
    low = 1 << (8 * length - 1)
    return st.one_of(
        st.integers(0, 40).map(str),
        st.integers(0, top).map(hex),
        st.integers(0, (1 << 64) - 1).map(str),
        st.integers(1, low).map(lambda n: f"-{n}"),
        st.sampled_from(["63", "64", "65", "0", "1"]),
    )


def conditions(length: int, leaves: int = 10) -> st.SearchStrategy[str]:
    """Texts of conditions for a watch of ``length`` bytes: every name, operator, literal
    form and ``signed``/``not`` nesting, fully parenthesized so that every text parses."""
    leaf = st.one_of(st.sampled_from(NAMES), _literal(length))

    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return st.one_of(
            st.tuples(inner, st.sampled_from(BINARY), inner).map(
                lambda t: f"({t[0]} {t[1]} {t[2]})"
            ),
            inner.map(lambda t: f"signed({t})"),
            inner.map(lambda t: f"(not {t})"),
        )

    return st.recursive(leaf, extend, max_leaves=leaves)
