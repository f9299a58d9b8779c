"""Meta expressions: every operator, precedence, errors with columns, no code execution."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from filterd.ruleset.expr import MAX_DEPTH, ExpressionError, compile_expression

VALUES = {"A": 1.0, "B": 0.0, "C": 2.0, "D": 1.0}


@pytest.mark.parametrize("text, expected", [
    ("A", 1), ("B", 0), ("UNKNOWN", 0),
    ("A && D", 1), ("A && B", 0), ("A and B", 0), ("A AND D", 1),
    ("A || B", 1), ("B || B", 0), ("B or A", 1),
    ("!A", 0), ("!B", 1), ("not B", 1), ("!!A", 1),
    ("A + C", 3), ("C - A", 1), ("C * C", 4), ("C / C", 1), ("C / B", 0), ("-C + 3", 1),
    ("A + C > 2", 1), ("A + C >= 3", 1), ("A + C < 3", 0), ("A + C <= 3", 1),
    ("C == 2", 1), ("C != 2", 0),
    ("A || B && B", 1),            # && binds tighter than ||
    ("(A || B) && B", 0),
    ("!A || D", 1),                # ! binds tighter than ||
    ("A + B * C", 1),              # * before +
    ("(A + B) * C", 2),
    ("A + D + C >= 3 && !B", 1),
    ("1.5 > 1", 1), (".5 < 1", 1),
])
def test_operators(text: str, expected: float) -> None:
    assert compile_expression(text)(VALUES) == expected


def test_references() -> None:
    assert compile_expression("A && (B || !C_2) + __H > 1").references == {"A", "B", "C_2", "__H"}


@pytest.mark.parametrize("text, column", [
    ("A &&", 5), ("A ) B", 3), ("(A || B", 8), ("A $ B", 3), ("", 1), ("A B", 3),
    ("__import__('os')", 12), ("A.b", 2),
])
def test_errors_give_the_column(text: str, column: int) -> None:
    with pytest.raises(ExpressionError) as err:
        compile_expression(text)
    assert err.value.column + 1 == column


def test_nesting_is_bounded() -> None:
    compile_expression("(" * 10 + "A" + ")" * 10)
    with pytest.raises(ExpressionError):
        compile_expression("(" * (MAX_DEPTH + 1) + "A" + ")" * (MAX_DEPTH + 1))
    with pytest.raises(ExpressionError):
        compile_expression("!" * (MAX_DEPTH + 5) + "A")


names = st.sampled_from(sorted(VALUES))
PY_OPS = {"&&": "and", "||": "or", "+": "+", ">": ">", "==": "=="}


@st.composite
def expressions(draw, depth: int = 0):  # type: ignore[no-untyped-def]
    """(our syntax, the same expression in Python syntax) as a reference oracle."""
    if depth > 3 or draw(st.booleans()):
        name = draw(names)
        return name, name
    op = draw(st.sampled_from(sorted(PY_OPS)))
    left, left_py = draw(expressions(depth + 1))
    right, right_py = draw(expressions(depth + 1))
    ours, py = f"({left} {op} {right})", f"({left_py} {PY_OPS[op]} {right_py})"
    if draw(st.booleans()):
        return f"!{ours}", f"(not {py})"
    return ours, py


@given(expressions())
def test_agrees_with_python_semantics(pair: tuple[str, str]) -> None:
    ours, py = pair
    expected = eval(py, {"__builtins__": {}}, dict(VALUES))  # test oracle only
    assert compile_expression(ours)(VALUES) == float(expected)
