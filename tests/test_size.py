"""The size ratchet: the library (the top-level *.py files a reader studies or copies) stays within the budget
below. The budget only goes down: a change that needs room makes it elsewhere (tools go to scripts/, speed
tools to bench/), never by compressing text or moving code between top-level files.

    python tests/test_size.py     # the figures this test checks (README's file map)
"""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ---- the budget (lower it when the library shrinks; never raise it)
TOTAL_BYTES = 237_167  # all top-level *.py together (231.6 KiB; the evaluation CLI keeps it above 205)
FILE_BYTES = 40 * 1024  # any one top-level file
FUNCTION_LINES = 80  # any function or method, decorators and docstring included
LINE_CHARS = 110  # any line
OPTIMIZER_STEP_SITES = 1  # `optimizer.step()` is called in one place: trainer.fit's step
MODEL_FILES = ("encoderec.py", "unisrec.py", "rqvae.py", "tiger.py")  # each copyable alone
NOT_IN_MODELS = ("argparse", "urllib", "http", "socket", "subprocess", "requests", "huggingface_hub")


def library() -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(ROOT.glob("*.py"))}


def functions(tree: ast.AST):
    """(name, lines) of every function and method, nested ones included."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            yield node.name, node.end_lineno - first + 1


def imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def step_sites(tree: ast.AST) -> int:
    """Calls `<x>.step()` with no arguments: optimizer steps (a schedule's or a progress bar's would count
    too, and none exists in the library)."""
    return sum(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "step"
               and not n.args and not n.keywords for n in ast.walk(tree))


def figures() -> list[dict]:
    out = []
    for name, src in library().items():
        tree = ast.parse(src)
        longest = max(functions(tree), key=lambda f: f[1], default=("-", 0))
        out.append({"file": name, "bytes": len(src.encode()), "lines": src.count("\n"), "longest_function":
                    longest, "longest_line": max(map(len, src.splitlines()), default=0),
                    "imports": imports(tree), "step_sites": step_sites(tree), "tree": tree, "src": src})
    return out


def table(figs) -> str:
    """The library's figures against the budget, then the tools' sizes (outside the budget)."""
    rows = [f"{'library':<32}{'bytes':>9}{'KiB':>8}{'lines':>7}  longest function, longest line"]
    for f in figs:
        rows.append(f"{f['file']:<32}{f['bytes']:>9,}{f['bytes'] / 1024:>8.1f}{f['lines']:>7}  "
                    f"{f['longest_function'][0]} {f['longest_function'][1]}, {f['longest_line']}")
    total = sum(f["bytes"] for f in figs)
    rows.append(f"{'total':<32}{total:>9,}{total / 1024:>8.1f}{sum(f['lines'] for f in figs):>7}  "
                f"budget {TOTAL_BYTES:,} bytes ({TOTAL_BYTES / 1024:.1f} KiB), "
                f"{FILE_BYTES // 1024} KiB a file")
    rows.append(f"{'tools (no budget)':<32}")
    for p in sorted([*ROOT.glob("scripts/*.py"), *ROOT.glob("scripts/*.sh"), *ROOT.glob("bench/*.py")]):
        text = p.read_text(encoding="utf-8")
        rows.append(f"{str(p.relative_to(ROOT)):<32}{len(text.encode()):>9,}{len(text.encode()) / 1024:>8.1f}"
                    f"{text.count(chr(10)):>7}")
    return "\n".join(rows)


def test_the_library_stays_within_its_budget():
    figs = figures()
    print("\n" + table(figs))
    total = sum(f["bytes"] for f in figs)
    assert total <= TOTAL_BYTES, f"top-level Python is {total:,} bytes, over the budget of {TOTAL_BYTES:,}"
    for f in figs:
        assert f["bytes"] <= FILE_BYTES, f"{f['file']} is {f['bytes']:,} bytes, over {FILE_BYTES:,}"
        long = [(n, k) for n, k in functions(f["tree"]) if k > FUNCTION_LINES]
        assert not long, f"{f['file']}: functions over {FUNCTION_LINES} lines: {long}"
        wide = [i + 1 for i, line in enumerate(f["src"].splitlines()) if len(line) > LINE_CHARS]
        assert not wide, f"{f['file']}: lines over {LINE_CHARS} characters: {wide}"
    sites = {f["file"]: f["step_sites"] for f in figs if f["step_sites"]}
    assert sum(sites.values()) == OPTIMIZER_STEP_SITES, f"optimizer-step sites: {sites}"


def test_model_files_are_models():
    """A model file imports no project file and holds no network or command-line code; the library never
    imports the tools."""
    figs = {f["file"]: f for f in figures()}
    project = {Path(n).stem for n in figs} | {"scripts", "bench", "tests"}
    for name in MODEL_FILES:
        f = figs[name]
        assert not f["imports"] & project, f"{name} imports {f['imports'] & project}"
        assert not f["imports"] & set(NOT_IN_MODELS), f"{name} imports {f['imports'] & set(NOT_IN_MODELS)}"
        assert "__main__" not in f["src"] and "sys.argv" not in f["src"], f"{name} holds a command line"
    for name, f in figs.items():
        assert not f["imports"] & {"scripts", "bench", "tests"}, f"{name} imports a tool"
        assert "sys.path" not in f["src"], f"{name} changes sys.path (to reach a tool?)"


if __name__ == "__main__":
    print(table(figures()))
    sys.exit(0)
