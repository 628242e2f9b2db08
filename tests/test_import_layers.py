"""The library's layers import one way (docs/architecture.md).

Every module under medgen_jax/ is parsed with `ast` (nothing is imported, so
this runs in well under a second) and each `import` of a medgen_jax module is
checked against the layer order:

  data < metrics < viz < conditioning < attention < models < classifier < train < inference
  < eval < studies < bench

A module may import its own package and any package to its left. The library
never imports the top-level `configs` or `experiments` packages (they sit on
top of it), imports medgen_jax modules at the top of the file only (so the
graph below is the whole graph), and the module graph has no cycles.
"""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
PACKAGE = "medgen_jax"
LAYERS = ("data", "metrics", "viz", "conditioning", "attention", "models", "classifier",
          "train", "inference", "eval", "studies", "bench")
# viz_volume is the 3D half of viz: one layer.
LAYER_OF = {**{name: i for i, name in enumerate(LAYERS)}, "viz_volume": LAYERS.index("viz")}
ABOVE_THE_LIBRARY = ("configs", "experiments")


def module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-len(".py")].split(os.sep)
  return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def library_modules() -> dict[str, str]:
  """{dotted module name: file path} of every module under medgen_jax/."""
  out = {}
  for dirpath, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        out[module_name(path)] = path
  return out


def imports(source: str, module: str) -> list[tuple[str, int, bool]]:
  """(imported dotted name, line, at module top level) for every import.

  `from a.b import c` yields 'a.b.c' (c may be a module or a name in a.b;
  callers resolve it to the longest known module prefix).
  """
  tree = ast.parse(source)
  top = set(id(node) for node in tree.body)
  # Imports under `if __name__ == "__main__":` (script entry points) count as
  # top level: they run once, when the module is the program.
  for node in tree.body:
    if isinstance(node, ast.If):
      top.update(id(n) for n in ast.walk(node))
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(a.name, node.lineno, id(node) in top) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: resolve against this module's package
        parts = module.split(".")[:len(module.split(".")) - node.level]
        base = ".".join(parts + ([base] if base else []))
      out += [(f"{base}.{a.name}", node.lineno, id(node) in top) for a in node.names]
  return out


def resolve(name: str, known: set[str]) -> str | None:
  """The longest prefix of `name` that is a library module, else None."""
  parts = name.split(".")
  for n in range(len(parts), 0, -1):
    candidate = ".".join(parts[:n])
    if candidate in known:
      return candidate
  return None


def layer(module: str) -> int | None:
  parts = module.split(".")
  return LAYER_OF.get(parts[1]) if len(parts) > 1 else None


def violations(sources: dict[str, str]) -> list[str]:
  """Every broken rule in {module name: source}, as readable lines."""
  known = set(sources)
  problems, graph = [], {m: set() for m in sources}
  for module, source in sorted(sources.items()):
    if len(module.split(".")) > 1 and layer(module) is None:
      problems.append(f"{module}: not in any layer; add it to LAYERS")
      continue
    for name, line, at_top in imports(source, module):
      root = name.split(".")[0]
      if root in ABOVE_THE_LIBRARY:
        problems.append(f"{module}:{line} imports {name}: the library never imports "
                        f"{root}/")
        continue
      target = resolve(name, known)
      if target is None:
        continue  # a third-party module
      if not at_top:
        problems.append(f"{module}:{line} imports {target} inside a function: library "
                        f"imports go at the top of the file")
      mine, theirs = layer(module), layer(target)
      if theirs is not None and mine is not None and theirs > mine:
        problems.append(f"{module}:{line} imports {target}: "
                        f"{LAYERS[mine]} sits below {LAYERS[theirs]}")
      if at_top and target != module:
        graph[module].add(target)
  problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
  return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle per strongly connected component with more than one module."""
  out, state, stack = [], {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        out.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node)
  return out


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def test_the_library_imports_downward_only():
  sources = {m: _read(p) for m, p in library_modules().items()}
  assert len(sources) > 50
  assert violations(sources) == []


@pytest.mark.parametrize("module, source, message", [
    ("medgen_jax.train.loop", "from medgen_jax.eval import evaluate\n",
     "train sits below eval"),
    ("medgen_jax.inference.quantize", "import medgen_jax.eval.evaluate\n",
     "inference sits below eval"),
    ("medgen_jax.classifier.cache", "from medgen_jax.train import loop\n",
     "classifier sits below train"),
    ("medgen_jax.models.discriminator", "from medgen_jax import classifier\n",
     "models sits below classifier"),
    ("medgen_jax.bench.suite", "from configs import phantom_gan\n",
     "the library never imports configs/"),
    ("medgen_jax.data.pipeline", "def f():\n  from medgen_jax.data import info\n",
     "inside a function"),
    ("medgen_jax.eval.a", "from medgen_jax.eval import b\n", "import cycle"),
    ("medgen_jax.plots.x", "import numpy\n", "not in any layer"),
])
def test_each_rule_can_fail(module, source, message):
  sources = {m: _read(p) for m, p in library_modules().items()}
  sources[module] = source
  if module == "medgen_jax.eval.a":
    sources["medgen_jax.eval.b"] = "from medgen_jax.eval import a\n"
  assert any(message in p for p in violations(sources)), violations(sources)
