"""The project's modules import each other in one direction: the lesson and the scripts use the machinery package,
which never uses them, and no two modules import each other, however deep in a function the import hides."""
import ast
import glob
import os

from conftest import ROOT


def project_imports():
    """{module: the project modules it imports anywhere in its file (function-level imports included)}."""
    files = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "machinery", "*.py"))
    names = {os.path.relpath(f, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__"): f for f in files}
    graph = {}
    for name, path in names.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)  # from machinery import world
        graph[name] = sorted(found & set(names) - {name})
    return graph


def cycle(graph):
    """An import cycle as a list of modules, or None."""
    done, path = set(), []
    def visit(m):
        if m in path:
            return path[path.index(m):] + [m]
        if m in done:
            return None
        path.append(m)
        for n in graph[m]:
            if found := visit(n):
                return found
        path.pop()
        done.add(m)
        return None
    return next((c for m in graph if (c := visit(m))), None)


def test_no_import_cycle_and_the_package_never_imports_the_lesson_or_the_scripts():
    graph = project_imports()
    assert {"train_gpt2", "hellaswag", "fineweb", "machinery.checkpoints", "machinery.world"} <= set(graph)
    assert cycle(graph) is None, " -> ".join(cycle(graph))
    for module, imported in graph.items():
        if module.startswith("machinery"):
            assert all(m.startswith("machinery") for m in imported), (module, imported)
    assert graph["fineweb"] == ["machinery.cli", "machinery.locks", "machinery.shards", "tokenizer"]
    assert "train_gpt2" not in graph["hellaswag"]  # the trainer imports it


def test_the_cycle_finder_finds_a_cycle():
    assert cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": []}) == ["a", "b", "c", "a"]
    assert cycle({"a": ["b"], "b": [], "c": ["a", "b"]}) is None
