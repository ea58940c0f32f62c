"""No function in fada_batch/ is longer than a screen: 80 lines, counted by `ast` from its
`def` (or its first decorator) to its last line, docstring and comments included.

A function that does not fit on one screen is two functions. The allow-list is empty; an
entry would need the function's qualified name and the reason it cannot be cut.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fada_batch"
MAX_LINES = 80
ALLOWED: dict[str, str] = {}  # "module.py:qualified.name" -> why it stays longer


def function_lengths(source: str, filename: str = "<source>") -> list[tuple[int, str, int]]:
    """(lines, qualified name, first line) of every function and method in `source`,
    nested ones included."""
    found: list[tuple[int, str, int]] = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                assert child.end_lineno is not None
                name = f"{prefix}{child.name}"
                found.append((child.end_lineno - start + 1, name, start))
                walk(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")
            else:
                walk(child, prefix)

    walk(ast.parse(source, filename=filename), "")
    return found


def package_lengths() -> list[tuple[int, str]]:
    """(lines, "path:qualified name") over the package, longest first."""
    rows = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for lines, name, _start in function_lengths(path.read_text(), str(path)):
            rows.append((lines, f"{rel}:{name}"))
    return sorted(rows, reverse=True)


def test_no_function_is_longer_than_a_screen():
    rows = package_lengths()
    print("longest functions:", *(f"{n} {where}" for n, where in rows[:5]), sep="\n  ")
    too_long = [f"{where}: {n} lines" for n, where in rows if n > MAX_LINES and where not in ALLOWED]
    assert not too_long, f"functions over {MAX_LINES} lines (cut each into named parts):\n" + "\n".join(
        too_long
    )


def test_the_allow_list_holds_only_reasons_for_functions_still_too_long():
    lengths = dict((where, n) for n, where in package_lengths())
    for where, why in ALLOWED.items():
        assert why.strip(), f"{where}: no reason given"
        assert lengths.get(where, 0) > MAX_LINES, f"{where} fits now (or is gone): drop its entry"


def test_the_count_runs_from_the_decorator_to_the_last_line_and_sees_methods():
    body = "\n".join(f"    x{i} = {i}" for i in range(79))  # 79 lines + the def: 80
    source = (
        f"def fits():\n{body}\n\n"
        f"@decorated\ndef too_long():\n{body}\n\n"
        "class C:\n    def method(self):\n        def inner():\n            pass\n        return inner\n"
    )
    got = {name: (n, start) for n, name, start in function_lengths(source)}
    assert got["fits"] == (80, 1)
    assert got["too_long"] == (81, 82)  # the decorator's line counts
    assert got["C.method"][0] == 4 and got["C.method.inner"][0] == 2
