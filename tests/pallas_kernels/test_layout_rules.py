"""Rules of the code's layout, read from the source (no compiles): each idea in one place.

- The token-by-token oracles (`<family>/reference.py`) are imported by the tests and by the family's
  registry of implementations (the module that lists `IMPLEMENTATIONS`, where "reference" is one of
  the four implementations of the op's contract), and by nothing else: decode steps and per-token
  updates live in `<family>/step.py`, which the oracle scans.
- No function of the kernels or the layers is written twice (the same body under two names or in
  two modules); a helper is defined once and imported where it is used.
"""

import ast
import collections
import pathlib

import seqmix

PACKAGE = pathlib.Path(seqmix.__file__).parent


def _modules(*folders):
    for folder in folders:
        for path in sorted((PACKAGE / folder).rglob("*.py")):
            yield path, ast.parse(path.read_text(), filename=str(path))


def _reference_imports(tree):
    """(module imported, names imported) of every import of a module named `reference`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[-1] == "reference":
                yield node.module, [alias.name for alias in node.names]
            for alias in node.names:
                if alias.name == "reference":
                    yield f"{node.module}.reference", ["*"]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[-1] == "reference":
                    yield alias.name, ["*"]


def _defines_implementations(tree):
    return any(isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "IMPLEMENTATIONS" for t in node.targets)
               for node in tree.body)


def test_only_the_registries_import_the_oracles():
    offenders = []
    for path, tree in _modules("."):
        for module, names in _reference_imports(tree):
            if not (_defines_implementations(tree) and all(name.endswith("_reference") for name in names)):
                offenders.append(f"{path.relative_to(PACKAGE.parent)} imports {names} from {module}")
    assert not offenders, "production code depends on a test oracle:\n" + "\n".join(offenders)


def _body_key(function):
    """The function's arguments and body without its docstring, as an AST dump."""
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    return ast.dump(function.args) + ast.dump(ast.Module(body=body, type_ignores=[]))


def test_no_kernel_or_layer_function_is_written_twice():
    bodies = collections.defaultdict(list)
    for path, tree in _modules("pallas_kernels", "layers"):
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                bodies[_body_key(node)].append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}")
    duplicates = [places for places in bodies.values() if len(places) > 1]
    assert not duplicates, "the same function in several places:\n" + "\n".join(map(str, duplicates))
