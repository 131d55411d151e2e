"""The package's structure, as docs/ARCHITECTURE.md states it: read from the code's imports."""

import ast
import os
import re

from absl.testing import absltest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PACKAGE = os.path.join(_ROOT, "keras_nd")
# The internal modules every floor may import (they import nothing of keras_nd's).
_INTERNAL = ("keras_nd._keras", "keras_nd._checks")
# "About 400 lines": a module a little over it is one concept with its checks, not two.
_MAX_LINES = 430


def _modules():
  found = {}
  for directory, _, names in os.walk(_PACKAGE):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        dotted = os.path.relpath(path, _ROOT)[:-3].replace(os.sep, ".")
        found[dotted.removesuffix(".__init__")] = path
  return found


def _tree(path):
  with open(path) as f:
    return ast.parse(f.read(), path)


def _imports(module, tree, modules):
  """(imported module, names taken from it) for every import of keras_nd, deferred ones too."""
  package = module if module.count(".") and _is_package(module) else module.rpartition(".")[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("keras_nd"):
          yield alias.name, ()
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] +
                        ([node.module] if node.module else []))
      if not base.startswith("keras_nd"):
        continue
      for alias in node.names:
        submodule = f"{base}.{alias.name}"
        if submodule in modules:
          yield submodule, ()
        else:
          yield base, (alias.name,)


def _is_package(module):
  return os.path.isdir(os.path.join(_ROOT, *module.split(".")))


def _graph():
  modules = _modules()
  edges = {}
  for module, path in modules.items():
    edges[module] = {target for target, _ in _imports(module, _tree(path), modules)
                     if target != module and target in modules}
  return modules, edges


class LayoutTest(absltest.TestCase):

  def test_imports_form_no_circle(self):
    _, edges = _graph()
    state = {}

    def visit(module, path):
      state[module] = "open"
      for target in sorted(edges.get(module, ())):
        if state.get(target) == "open":
          self.fail("Import circle: " + " -> ".join(path[path.index(target):] + [target]))
        if target not in state:
          visit(target, path + [target])
      state[module] = "done"

    for module in sorted(edges):
      if module not in state:
        visit(module, [module])

  def test_internal_modules_import_nothing_of_the_package(self):
    _, edges = _graph()
    for module in _INTERNAL:
      self.assertEmpty(edges[module], module)

  def test_no_private_name_crosses_a_module(self):
    modules = _modules()
    paths = dict(modules)
    for name in os.listdir(os.path.join(_ROOT, "examples")):
      if name.endswith(".py"):
        paths[f"examples.{name[:-3]}"] = os.path.join(_ROOT, "examples", name)
    for module, path in paths.items():
      tree = _tree(path)
      aliases = {}
      for target, names in _imports(module, tree, modules):
        for name in names:
          self.assertFalse(name.startswith("_"), f"{module} imports {target}.{name}")
      for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("keras_nd"):
          for alias in node.names:
            if f"{node.module}.{alias.name}" in modules:
              aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.Import):
          for alias in node.names:
            if alias.name.startswith("keras_nd") and alias.asname:
              aliases[alias.asname] = alias.name
      for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id in aliases and node.attr.startswith("_")
            and not node.attr.startswith("__")):
          self.fail(f"{module} reaches {node.value.id}.{node.attr}")

  def test_every_module_declares_its_public_names(self):
    for module, path in _modules().items():
      tree = _tree(path)
      declared = any(isinstance(node, ast.Assign) and any(
          isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
                     for node in tree.body)
      if tree.body:
        self.assertTrue(declared, f"{module} has no __all__")

  def test_modules_are_short_or_named_as_exceptions(self):
    long_ones = _architecture_long_modules()
    for module, path in _modules().items():
      with open(path) as f:
        lines = sum(1 for _ in f)
      if module in long_ones:
        continue
      self.assertLessEqual(lines, _MAX_LINES, f"{module} has {lines} lines; split it by concept, "
                           "or say in docs/ARCHITECTURE.md why one concept needs them")

  def test_architecture_names_every_module_and_only_those(self):
    with open(os.path.join(_ROOT, "docs", "ARCHITECTURE.md")) as f:
      text = f.read()
    named = set(re.findall(r"^(keras_nd/[\w/]+\.py)\b", text, re.M))
    files = {os.path.relpath(path, _ROOT) for path in _modules().values()}
    self.assertEqual(sorted(files - named), [], "modules missing from docs/ARCHITECTURE.md")
    self.assertEqual(sorted(named - files), [], "docs/ARCHITECTURE.md names missing modules")


def _architecture_long_modules():
  with open(os.path.join(_ROOT, "docs", "ARCHITECTURE.md")) as f:
    text = f.read()
  return {m.replace("/", ".")[:-3] for m in re.findall(r"^(keras_nd/[\w/]+\.py)\b.*\(long:",
                                                        text, re.M)}


if __name__ == "__main__":
  absltest.main()
