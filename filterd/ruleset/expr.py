"""Meta rule expressions: a small, safe parser and evaluator (never `eval`).

Trusts: nothing; an expression is data from a rule file. Parsing either returns a compiled
`Expression` or raises `ExpressionError` with the column of the problem.
Settings: none. Symbols: none (filterd.ruleset.engine turns a true expression into a hit).

Grammar (SpamAssassin's meta syntax, plus `and`/`or`/`not` as words):
    expr    := or
    or      := and   (("||" | "or")  and)*
    and     := compare (("&&" | "and") compare)*
    compare := sum   ((">" | ">=" | "<" | "<=" | "==" | "!=") sum)?
    sum     := term  (("+" | "-") term)*
    term    := unary (("*" | "/") unary)*
    unary   := ("-" | "!" | "not") unary | atom   (tightest, as Perl's "!": "!A + B" is "(!A) + B")
    atom    := NUMBER | SYMBOL_NAME | "(" expr ")"
A symbol name stands for how many times that symbol fired (0 when it did not); a comparison or
! gives 1 or 0; && and || give the operand that decided, as in Perl (so SpamAssassin metas such
as "(A && B) + C > 1" mean the same). Division by zero gives 0 rather than an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

Evaluator = Callable[[Mapping[str, float]], float]


class ExpressionError(ValueError):
    def __init__(self, problem: str, column: int):
        self.problem, self.column = problem, column
        super().__init__(f"{problem} at column {column + 1}")


_TOKEN = re.compile(r"""
    \s*(?:
      (?P<number>\d+(?:\.\d+)?|\.\d+)
    | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<op>\|\||&&|>=|<=|==|!=|[!<>()+\-*/])
    )""", re.X)

_WORD_OPS = {"and": "&&", "or": "||", "not": "!"}
MAX_DEPTH = 64   # nesting limit: a hostile expression must not exhaust the stack


@dataclass(frozen=True, slots=True)
class Expression:
    source: str
    references: frozenset[str]
    evaluate: Evaluator

    def __call__(self, values: Mapping[str, float]) -> float:
        return self.evaluate(values)


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    tokens: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            col = pos + (len(text[pos:]) - len(text[pos:].lstrip()))
            raise ExpressionError(f"unexpected character {text[col]!r}", col)
        col = m.start(m.lastgroup) if m.lastgroup else pos
        kind = m.lastgroup or ""
        value = m.group(kind)
        if kind == "name" and value.lower() in _WORD_OPS:
            kind, value = "op", _WORD_OPS[value.lower()]
        tokens.append((kind, value, col))
        pos = m.end()
    tokens.append(("end", "", len(text)))
    return tokens


class _Parser:
    def __init__(self, text: str):
        self.tokens = _tokenize(text)
        self.i = 0
        self.refs: set[str] = set()
        self.depth = 0

    def peek(self) -> tuple[str, str, int]:
        return self.tokens[self.i]

    def take(self) -> tuple[str, str, int]:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def accept(self, *ops: str) -> str | None:
        kind, value, _ = self.peek()
        if kind == "op" and value in ops:
            self.i += 1
            return value
        return None

    def parse(self) -> Evaluator:
        node = self.or_()
        kind, value, col = self.peek()
        if kind != "end":
            raise ExpressionError(f"unexpected {value!r}", col)
        return node

    def or_(self) -> Evaluator:
        left = self.and_()
        while self.accept("||"):
            right = self.and_()
            left = (lambda a, b: lambda v: a(v) or b(v))(left, right)
        return left

    def and_(self) -> Evaluator:
        left = self.not_()
        while self.accept("&&"):
            right = self.not_()
            left = (lambda a, b: lambda v: a(v) and b(v))(left, right)
        return left

    def not_(self) -> Evaluator:
        # "!" binds tightest (unary), as in Perl: "!A + B" is "(!A) + B"
        return self.compare()

    def compare(self) -> Evaluator:
        left = self.sum_()
        op = self.accept(">", ">=", "<", "<=", "==", "!=")
        if op is None:
            return left
        right = self.sum_()
        funcs: dict[str, Callable[[float, float], bool]] = {
            ">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b,
            "<=": lambda a, b: a <= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}
        fn = funcs[op]
        return lambda v: 1.0 if fn(left(v), right(v)) else 0.0

    def sum_(self) -> Evaluator:
        left = self.term()
        while True:
            op = self.accept("+", "-")
            if op is None:
                return left
            right = self.term()
            if op == "+":
                left = (lambda a, b: lambda v: a(v) + b(v))(left, right)
            else:
                left = (lambda a, b: lambda v: a(v) - b(v))(left, right)

    def term(self) -> Evaluator:
        left = self.unary()
        while True:
            op = self.accept("*", "/")
            if op is None:
                return left
            right = self.unary()
            if op == "*":
                left = (lambda a, b: lambda v: a(v) * b(v))(left, right)
            else:
                left = (lambda a, b: lambda v: _divide(a(v), b(v)))(left, right)

    def unary(self) -> Evaluator:
        op = self.accept("-", "!")
        if op is not None:
            self._enter()
            inner = self.unary()
            self.depth -= 1
            if op == "!":
                return lambda v: 0.0 if inner(v) else 1.0
            return lambda v: -inner(v)
        return self.atom()

    def atom(self) -> Evaluator:
        kind, value, col = self.take()
        if kind == "number":
            number = float(value)
            return lambda v: number
        if kind == "name":
            self.refs.add(value)
            return lambda v: float(v.get(value, 0.0))
        if kind == "op" and value == "(":
            self._enter()
            inner = self.or_()
            self.depth -= 1
            kind2, value2, col2 = self.take()
            if not (kind2 == "op" and value2 == ")"):
                raise ExpressionError(f"expected ')' but found {value2 or 'the end'!r}", col2)
            return inner
        if kind == "end":
            raise ExpressionError("expression ends too early", col)
        raise ExpressionError(f"unexpected {value!r}", col)

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExpressionError(f"nested more than {MAX_DEPTH} deep", self.peek()[2])


def _divide(a: float, b: float) -> float:
    return a / b if b else 0.0


def compile_expression(text: str) -> Expression:
    """Parse a meta expression; raises ExpressionError naming the column of the problem."""
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError("empty expression", 0)
    parser = _Parser(text)
    evaluator = parser.parse()
    return Expression(text, frozenset(parser.refs), evaluator)
