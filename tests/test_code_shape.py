"""The code stays in small functions: none in operator/, agent/ or dev/ longer than MAX_LINES lines or
with a cyclomatic complexity above MAX_COMPLEXITY.

Complexity is McCabe's, counted on the syntax tree: 1, plus one for each decision point: ``if`` and
``elif``, conditional expression, ``for`` and ``while`` (comprehensions' ``for`` included), each
comprehension ``if``, ``except`` clause, ``match`` case, and each extra operand of ``and`` / ``or``.
A nested function or class is measured on its own and adds nothing to the function around it; its
lines do count in the enclosing function's length.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("operator", "agent", "dev")
MAX_LINES = 80
MAX_COMPLEXITY = 15

Function = ast.FunctionDef | ast.AsyncFunctionDef
SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
BRANCHES = (ast.If, ast.IfExp, ast.For, ast.AsyncFor, ast.While, ast.ExceptHandler, ast.match_case)


@dataclass(frozen=True)
class Shape:
    where: str  # path:line
    name: str  # qualified: Class.method, outer.inner
    lines: int
    complexity: int

    def __str__(self) -> str:
        return f"{self.where} {self.name}: {self.lines} lines, complexity {self.complexity}"


def complexity(function: Function) -> int:
    """McCabe complexity of ``function``'s own body (nested functions and classes left out)."""
    count = 1
    pending: list[ast.AST] = list(ast.iter_child_nodes(function))
    while pending:
        node = pending.pop()
        if isinstance(node, SCOPES):
            continue
        if isinstance(node, BRANCHES):
            count += 1
        elif isinstance(node, ast.BoolOp):
            count += len(node.values) - 1
        elif isinstance(node, ast.comprehension):
            count += 1 + len(node.ifs)
        pending.extend(ast.iter_child_nodes(node))
    return count


def shapes(path: Path) -> list[Shape]:
    """Every function and method defined in the file at ``path``."""
    found: list[Shape] = []
    relative = path.relative_to(REPO)

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                lines = (child.end_lineno or child.lineno) - child.lineno + 1
                found.append(Shape(f"{relative}:{child.lineno}", name, lines, complexity(child)))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(), str(path)), "")
    return found


def source_files() -> list[Path]:
    return sorted(path for directory in SOURCE_DIRS for path in (REPO / directory).rglob("*.py"))


def offenders() -> list[Shape]:
    return [
        shape
        for path in source_files()
        for shape in shapes(path)
        if shape.lines > MAX_LINES or shape.complexity > MAX_COMPLEXITY
    ]


def test_measure_counts_each_kind_of_decision_point() -> None:
    source = '''
def f(xs, flag):
    if flag and xs or not xs:
        return [x for x in xs if x if x > 1]
    elif xs:
        pass
    for x in xs:
        while x:
            x -= 1
    try:
        y = 1 if flag else 2
    except ValueError:
        pass
    except KeyError:
        pass
    match y:
        case 1:
            pass
        case _:
            pass

    def inner():
        if flag:
            pass
    return inner
'''
    (function,) = [node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)]
    # 1 + if, 2 bool operands, comprehension (for + 2 ifs), elif, for, while, ternary, 2 excepts, 2 cases
    assert complexity(function) == 1 + 1 + 2 + 3 + 1 + 1 + 1 + 1 + 2 + 2


def test_every_source_file_is_measured() -> None:
    names = {path.relative_to(REPO).as_posix() for path in source_files()}
    assert {"operator/moe_operator/control.py", "agent/moe_agent/server.py", "dev/moeplace_dev/cluster.py"} <= names


def test_functions_are_short_and_simple() -> None:
    found = offenders()
    report = "\n".join(str(shape) for shape in found)
    assert not found, (
        f"{len(found)} functions are longer than {MAX_LINES} lines or more complex than {MAX_COMPLEXITY}:\n{report}"
    )
