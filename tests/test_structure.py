"""The package's layout holds: stages in data-flow order, no import cycle, every module importable
alone, and every import inside a function says why it is there.

The module graph is read from the source (``ast``), so imports inside functions count too: a
cycle or an upward import hidden in a function is still one in the design.  Edges follow what
Python executes: importing ``a.b.c`` runs ``a.b`` too, and an import of a module's own ancestor
package is no edge (that package is already running when the module runs).
"""

import ast
import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "regift_jax"

# The stages in data-flow order: a module imports only from its own stage or from stages listed
# before it.  A module belongs to the entry with the longest matching name (a package name covers
# its submodules), so the command-line modules inside a stage's folder are listed on their own.
STAGES = (
    ("package", ("regift_jax",)),
    ("core", ("regift_jax.core",)),
    ("models", ("regift_jax.models",)),
    ("data", ("regift_jax.data",)),
    ("traces", ("regift_jax.traces",)),
    ("training", ("regift_jax.training",)),
    ("eval", ("regift_jax.eval",)),
    ("preflight", ("regift_jax.preflight",)),
    ("experiment", ("regift_jax.experiment",)),
    ("cli", ("regift_jax.train", "regift_jax.evaluate", "regift_jax.generate_traces",
             "regift_jax.lm_eval", "regift_jax.models.generate")),
)
RANK = {prefix: (rank, stage) for rank, (stage, prefixes) in enumerate(STAGES)
        for prefix in prefixes}

# Third-party packages the import check loads once before importing each package module alone.
WARM = ("numpy", "jax", "jax.numpy", "flax", "flax.linen", "optax", "orbax.checkpoint",
        "ml_collections", "absl.flags", "tensorflow", "tensorflow_datasets", "transformers",
        "matplotlib")
IMPORT_TIMEOUT_S = 600


# ------------------------------------------------------------------------------------------------
# reading the source
# ------------------------------------------------------------------------------------------------

def package_modules():
    """{module name: file path} of every module of the package."""
    root = os.path.join(REPO, PACKAGE)
    mods = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            path = os.path.join(dirpath, fn)
            name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
            if name.endswith(".__init__"):
                name = name[: -len(".__init__")]
            mods[name] = path
    return mods


def _parse(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return ast.parse(text, path), text.splitlines()


def _imports(tree):
    """(import node, inside a function?) for every import statement of a module."""
    out = []

    def visit(node, in_fn):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.append((child, in_fn))
            visit(child, in_fn or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(tree, False)
    return out


def _targets(module, is_pkg, node):
    """The dotted names an import statement may load (modules or attributes of modules)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = module if is_pkg else module.rsplit(".", 1)[0]
    if node.level:
        parts = base.split(".")
        base = ".".join(parts[: len(parts) - (node.level - 1)])
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module or ""
    return [target] + [f"{target}.{a.name}" for a in node.names]


def import_edges():
    """[(importer, imported, path, line, inside a function)] between modules of the package."""
    mods = package_modules()
    edges = []
    for mod, path in mods.items():
        tree, _ = _parse(path)
        is_pkg = path.endswith("__init__.py")
        for node, in_fn in _imports(tree):
            seen = set()
            for target in _targets(mod, is_pkg, node):
                parts = target.split(".")
                for k in range(1, len(parts) + 1):
                    dep = ".".join(parts[:k])
                    if dep in mods and dep != mod and not mod.startswith(dep + ".") \
                            and dep not in seen:
                        seen.add(dep)
                        edges.append((mod, dep, path, node.lineno, in_fn))
    return edges


def stage_of(module):
    best = None
    for prefix, value in RANK.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, value)
    return None if best is None else best[1]


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _rel(path):
    return os.path.relpath(path, REPO)


# ------------------------------------------------------------------------------------------------
# the checks
# ------------------------------------------------------------------------------------------------

def test_no_import_cycle():
    graph = {m: set() for m in package_modules()}
    where = {}
    for a, b, path, line, _ in import_edges():
        graph[a].add(b)
        where.setdefault((a, b), f"{_rel(path)}:{line}")
    found = cycles(graph)
    report = []
    for comp in found:
        inside = sorted(f"{a} -> {b} ({where[a, b]})" for a in comp for b in graph[a] if b in comp)
        report.append("cycle " + " <-> ".join(comp) + ":\n    " + "\n    ".join(inside))
    assert not found, "import cycles (imports inside functions included):\n" + "\n".join(report)


def test_every_module_has_a_stage():
    missing = [m for m in package_modules() if stage_of(m) is None]
    assert not missing, f"modules outside every stage of STAGES in {__file__}: {missing}"


def test_imports_only_from_stages_below():
    bad = []
    for a, b, path, line, in_fn in import_edges():
        sa, sb = stage_of(a), stage_of(b)
        if sa is not None and sb is not None and sb[0] > sa[0]:
            where = "inside a function" if in_fn else "at module level"
            bad.append(f"{_rel(path)}:{line}: {a} ({sa[1]}) imports {b} ({sb[1]}) {where}")
    order = " -> ".join(stage for stage, _ in STAGES)
    assert not bad, f"imports from a later stage (order: {order}):\n" + "\n".join(sorted(bad))


def _has_lazy_comment(lines, lineno):
    """`# lazy:` on the import's first line or in the comment lines right above it."""
    if "# lazy:" in lines[lineno - 1]:
        return True
    i = lineno - 2
    while i >= 0 and lines[i].strip().startswith("#"):
        if "# lazy:" in lines[i]:
            return True
        i -= 1
    return False


def test_imports_inside_functions_say_why():
    bad = []
    for mod, path in package_modules().items():
        tree, lines = _parse(path)
        for node, in_fn in _imports(tree):
            if in_fn and not _has_lazy_comment(lines, node.lineno):
                bad.append(f"{_rel(path)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not bad, (f"{len(bad)} imports inside functions without a '# lazy: why' comment on "
                     "the same line or the line above:\n" + "\n".join(bad))


# One interpreter loads the third-party packages once, then forks a child per package module; the
# child imports that module with no other module of the package loaded, so each import runs as
# in a fresh interpreter while jax, tensorflow & co. are paid for once.  Without os.fork every
# module gets its own interpreter.  A module whose optional third-party dependency (an extra such
# as lm_eval) is not installed is reported as OPTIONAL + the dependency's name, and passes.
OPTIONAL = "optional dependency not installed: "
_IMPORT_ALONE = f"OPTIONAL = {OPTIONAL!r}\n" + textwrap.dedent("""
    import importlib, importlib.util, json, os, signal, sys, traceback
    modules, warm, per_module_s = json.loads(sys.argv[1])

    def import_one(name):
        try:
            importlib.import_module(name)
            return ""
        except ModuleNotFoundError as e:
            top = (e.name or "").split(".")[0]
            if top and top != "regift_jax" and importlib.util.find_spec(top) is None:
                return OPTIONAL + top
            return traceback.format_exc(limit=-8)
        except BaseException:
            return traceback.format_exc(limit=-8)

    if not hasattr(os, "fork"):
        print(json.dumps({m: import_one(m) for m in modules[:1]}))
        sys.exit(0)
    for w in warm:
        try:
            importlib.import_module(w)
        except ImportError:
            pass
    assert not [m for m in sys.modules if m == "regift_jax" or m.startswith("regift_jax.")]
    results = {}
    for name in modules:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            signal.alarm(per_module_s)
            err = import_one(name)
            os.write(w, err.encode())
            os._exit(1 if err else 0)
        os.close(w)
        chunks = []
        while True:
            data = os.read(r, 65536)
            if not data:
                break
            chunks.append(data)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        err = b"".join(chunks).decode(errors="replace")
        if status and not err:
            err = f"child ended with wait status {status} (timeout: {per_module_s} s)"
        results[name] = err
    print(json.dumps(results))
""")


def test_every_module_imports_alone():
    mods = sorted(package_modules())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    results = {}
    pending = mods
    while pending:  # one interpreter normally; one per module where os.fork is missing
        r = subprocess.run([sys.executable, "-c", _IMPORT_ALONE,
                            json.dumps([pending, list(WARM), 300])],
                           capture_output=True, text=True, env=env, cwd=REPO,
                           timeout=IMPORT_TIMEOUT_S)
        assert r.returncode == 0, r.stderr[-5000:]
        done = json.loads(r.stdout.strip().splitlines()[-1])
        results.update(done)
        pending = [m for m in pending if m not in done]
    failed = {m: err for m, err in results.items() if err and not err.startswith(OPTIONAL)}
    assert not failed, "modules that fail to import alone:\n" + "\n".join(
        f"--- {m}\n{err}" for m, err in sorted(failed.items()))


@pytest.mark.parametrize("text,expected", [
    ("def f():\n    import os  # lazy: why\n", True),
    ("def f():\n    # lazy: why\n    import os\n", True),
    ("def f():\n    # lazy: the reason,\n    # on two lines\n    import os\n", True),
    ("def f():\n    import os\n", False),
    ("def f():\n    x = 1  # lazy: not about the import\n    import os\n", False),
])
def test_lazy_comment_rule(text, expected):
    tree = ast.parse(text)
    ((node, in_fn),) = _imports(tree)
    assert in_fn
    assert _has_lazy_comment(text.splitlines(), node.lineno) is expected


def test_stage_table():
    assert stage_of("regift_jax.models.generate")[1] == "cli"
    assert stage_of("regift_jax.models.sampling")[1] == "models"
    assert stage_of("regift_jax.train")[1] == "cli"
    assert stage_of("regift_jax.training.loop")[1] == "training"
    assert stage_of("regift_jax")[1] == "package"
    assert stage_of("numpy") is None


def test_cycle_finder():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
