"""Line counts per room, the largest modules and functions of a package tree (for reviews).

python scripts/house_stats.py [PACKAGE_DIR]
"""

from __future__ import annotations

import ast
import collections
import sys
from pathlib import Path


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "tileup")
    rooms: collections.Counter[str] = collections.Counter()
    files: list[tuple[int, str]] = []
    functions: list[tuple[int, str]] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        text = path.read_text()
        lines = text.count("\n")
        rooms[rel.split("/")[0]] += lines
        files.append((lines, rel))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                functions.append((node.end_lineno - node.lineno + 1, f"{rel}:{node.name}"))
    print(f"total {sum(rooms.values())} lines in {len(files)} modules")
    for room, lines in rooms.most_common():
        print(f"  {room:<22}{lines:>6}")
    print("largest modules:", ", ".join(f"{r} {n}" for n, r in sorted(files, reverse=True)[:6]))
    print(
        "largest functions:", ", ".join(f"{r} {n}" for n, r in sorted(functions, reverse=True)[:6])
    )


if __name__ == "__main__":
    main()
