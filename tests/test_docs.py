"""The docs cite only what exists: every name README.md, docs/*.md and launch/README.md put in
backticks, and every command in their bash blocks, is looked up in the repository.

How a cited token is read, by its shape (the first rule that applies):

1. Tokens on the explicit lists below are skipped: outside files and names (`EXTERNAL`), and
   errors the docs show on purpose (`SHOWN_ERRORS`).
2. A command (`python -m eiw_flow_jax.<cmd> ...`, `python bench/x.py ...`, a bench or launch
   script, `python -m pytest ...`): the module or script must exist and each `--flag` must be
   one it defines (`--config.<field>` a field of `base_config()`; `--noX` a boolean `X`);
   path arguments must exist. Flags of XLA (`--xla_...`) are XLA's and not checked. Other
   programs (`pip`, `git`, `kill`, ...) are not checked.
3. A flag without its command (`--mode=eval`): one of the flags of our commands, bench/,
   tools/ or launch/ scripts (or pytest's `-n`, `--pdb`).
4. A call or signature (`build_flow(config)`, `split(z) -> SplitOutput`): the name before the
   parenthesis, read by the rules below. An assignment (`model.memory = "remat"`,
   `split="eiw"`): its left-hand side.
5. A path (it holds `/` or ends in a file extension): a file or folder of the repository, given
   from the root or as the tail of a tracked path (`backbones/glow.py`); a pytest node id
   (`tests/x.py::test_y`) also needs the test. Skipped: URLs and absolute paths (not ours), paths
   with a placeholder (`DIR/...`, `<...>`, `*`), a run's outputs (`workdirs/`, `samples/`, ...),
   and TensorBoard tags (`shuffle/level0/...`), whose last part must be a name the code uses.
6. A dotted name: a config field (`model.eiw.mode`, `config.optimizer.learning_rate`; a tail of
   a `base_config()` path), or a chain of the package's modules, classes and their members
   (`train_loop.train`, `Flow.sample`, `eiw_flow_jax.model.flow`; classes through their bases;
   `flow.` is a `Flow`, `state.` a `TrainState`), or an attribute of an outside library
   (`jax.jit`, `optax.adam`, `lax.scan`), looked up by importing it.
7. A bare name: CamelCase must be a class or name defined in the package or one of the outside
   libraries searched; any other identifier must be defined or used in the repository's Python
   (a module, function, class, attribute, argument, config field, flag, string value, test,
   config or bench file name) or, UPPER_CASE, appear in its sources (environment variables).
   Math notation is skipped: one- or two-letter names, subscripted ones (`x_a`, `IWBO_k`) and
   Greek letters.
8. Anything else with a space, an operator or brackets is an expression or prose: skipped.

Names defined in the docs' own python blocks (the worked example's new coupling) count as
defined in that document.
"""

from __future__ import annotations

import ast
import functools
import importlib
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO

from eiw_flow_jax.commands import table
from eiw_flow_jax.config.schema import base_config

ROOT = Path(REPO)
THIS_FILE = "tests/test_docs.py"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "launch" / "README.md"]

# Outside the repository: data and checkpoints users bring, the authors' code, library and tool
# names that are not importable here (torch, TensorFlow's formats, shell commands).
EXTERNAL = {
    "check/checkpoint.pt", "DIW-Flow/", "studying910/EIW-Flow", "bedroom_train_lmdb/",
    "bedroom_val_lmdb/", "church_outdoor_*", "train_32x32.tar", "valid_32x32.tar", "_64x64",
    "download.py -c bedroom", "tfrecord", "KLDivLoss", "learntop", "add_edge_padding",
    "conv2d_zeros", "logscale_factor=3", "--checkpointing", "checkpointing=True", "torch_ckpt",
    "jax[tpu]", "jax[cuda12]", "libtpu", "lmdb", "madvise", "Free page reporting enabled",
    "import jax; jax.devices()", "tfds build", "kill -9", "convert_format", "jax_enable_x64",
    "transpose_copy_fusion",
}
# Other repositories' files and code the docs cite at file and line (docs/datasets.md: which
# data each paper used): the roots of their paths, their scripts' names and flags, and the code
# quoted from them. Data archives users download are named here too.
OUTSIDE_PATH_ROOTS = {
    "research", "denseflow", "DIW-Flow", "flows_imagenet", "data_loaders", "processed",
    "make_imagenet_data.py", "real_nvp_multiscale_dataset.py", "lsun.py", "train.py",
    "experiments", "optim", "train_more.py",
}
EXTERNAL |= {
    "Imagenet32_train.zip", "Imagenet32_val.zip", "Imagenet64_train_part1.zip",
    "Imagenet64_train_part2.zip", "Imagenet64_val.zip", "_part2.zip", "img_align_celeba",
    "--augmentation horizontal_flip", "--realnvp", "--problem lsun_realnvp", "rnd_crop",
    "cropped_img = crop(img, 40, 15, 148, 148)", "img.resize((64, 64), Image.BILINEAR)",
    "tf.image.resize_images(x_in, [64, 64], method=0, align_corners=False)",
    "skimage.transform.pyramid_reduce(image, downscale)", "tf.random_crop(image, [64, 64, 3])",
    "tf.compat.v1.image.resize_images(method=0, align_corners=False)",
    "--gamma", "--sigma", "--use_grad_norm", "ExponentialLR(--gamma)", "FlowExperiment.train_fn",
    "LinearWarmupScheduler", "loglik_bpd", "model.log_prob(x)", "model.train()",
    "optimizer.step()", "xlogy",
    # XLA's and CUDA's own names, which docs/gpu.md explains.
    "GpuTargetConfig", "HloCostAnalysis", "Compiled.cost_analysis()", "cuInit",
    "XLA_PYTHON_CLIENT_ALLOCATOR=platform", "XLA_PYTHON_CLIENT_PREALLOCATE=false",
    'jax_default_matmul_precision="highest"',
}
# Errors the docs show on purpose: the misspelt field is the point of the example.
SHOWN_ERRORS = {"config.model.memroy = 3", "--config.model.coupling=afine_tanh"}

# Outside libraries, by the names the docs use for them.
LIBRARIES = {
    "jax": "jax", "jnp": "jax.numpy", "lax": "jax.lax", "nn": "flax.linen", "flax": "flax",
    "optax": "optax", "ocp": "orbax.checkpoint", "orbax": "orbax", "tfds": "tensorflow_datasets",
    "np": "numpy", "numpy": "numpy", "etils": "etils", "grain": "grain",
    "ml_collections": "ml_collections", "absl": "absl",
    "multihost_utils": "jax.experimental.multihost_utils",
}
# Where CamelCase names not defined in the package are looked for.
CLASS_LIBRARIES = ("jax", "jax.sharding", "flax.linen", "flax.errors", "orbax.checkpoint",
                   "optax", "tensorflow_datasets.core", "ml_collections")
# What a lower-case first part of a dotted name stands for in the docs' examples.
INSTANCES = {"flow": ("Flow", "DenseFlow"), "state": ("TrainState",), "step": ("FlowStep",),
             "tx": ("optax.GradientTransformation",)}
GREEK = {"alpha", "beta", "gamma", "lambda", "mu", "pi", "sigma", "theta"}
# First path parts that are a run's outputs or a user's directories, not repository files.
OUTPUT_ROOTS = {"workdirs", "samples", "checkpoints", "checkpoints_corrupt", ".venv"}
TENSORBOARD_ROOTS = {"shuffle", "train", "eval", "samples"}
PLACEHOLDER = re.compile(r"(^|/)([A-Z][A-Z_]*)(\.\w+)?(/|:|$)|[<>*{}]|\.\.\.")
FILE_SUFFIXES = (".py", ".md", ".sh", ".sbatch", ".ipynb", ".json", ".txt", ".cfg", ".toml",
                 ".png", ".pt", ".tar", ".log")
ABSL_FLAGS = {"help", "helpfull", "helpshort", "verbosity", "v", "logtostderr",
              "alsologtostderr", "log_dir", "flagfile", "only_check_args"}
PYTEST_FLAGS = {"n", "pdb", "q", "k", "m", "x", "s", "v"}
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
DOTTED = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+")


# ----------------------------------------------------------------------------------------------
# Reading markdown.


def fenced_blocks(text: str) -> Iterator[tuple[str, int, str]]:
  """(language, first line number, body) of each ``` block."""
  lines = text.splitlines()
  i = 0
  while i < len(lines):
    match = re.match(r"\s*```(\w*)", lines[i])
    if match:
      start, body = i + 1, []
      i += 1
      while i < len(lines) and not lines[i].strip().startswith("```"):
        body.append(lines[i])
        i += 1
      yield match.group(1), start + 1, "\n".join(body)
    i += 1


def code_spans(text: str) -> Iterator[tuple[int, str]]:
  """(line number, content) of each inline code span outside fenced blocks."""
  outside = []
  in_block = False
  for line in text.splitlines():
    if line.strip().startswith("```"):
      in_block = not in_block
      outside.append("")
    else:
      outside.append("" if in_block else line)
  prose = "\n".join(outside)
  for match in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", prose, re.S):
    content = match.group(2).replace("\n", " ").strip()
    yield prose.count("\n", 0, match.start()) + 1, content.replace("\\|", "|")


# ----------------------------------------------------------------------------------------------
# What the repository holds.


class Module:
  """One Python file's definitions, read statically."""

  def __init__(self, name: str, path: Path):
    self.name, self.path = name, path
    tree = ast.parse(path.read_text(), str(path))
    self.names: dict[str, str] = {}  # top-level name -> "class" | "def" | "value" | "import"
    self.imports: dict[str, str] = {}  # local name -> dotted target
    self.classes: dict[str, ast.ClassDef] = {}
    self.lazy = False  # a module __getattr__: names resolved by importing
    for node in tree.body:
      if isinstance(node, ast.ClassDef):
        self.names[node.name] = "class"
        self.classes[node.name] = node
      elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        self.names[node.name] = "def"
        self.lazy |= node.name == "__getattr__"
      elif isinstance(node, (ast.Assign, ast.AnnAssign)):
        for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
          for leaf in ast.walk(target):
            if isinstance(leaf, ast.Name):
              self.names[leaf.id] = "value"
    top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    for node in top_level:  # (not imports in functions: those are no attribute of the module)
      if isinstance(node, ast.Import):
        for alias in node.names:
          self.imports[alias.asname or alias.name.split(".")[0]] = (
              alias.name if alias.asname else alias.name.split(".")[0])
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        for alias in node.names:
          self.imports[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    self.tree = tree


def class_members(node: ast.ClassDef) -> set[str]:
  """Methods, class-level names and fields, and `self.x` set in any method."""
  members = set()
  for item in node.body:
    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      members.add(item.name)
    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
      members.add(item.target.id)
    elif isinstance(item, ast.Assign):
      members.update(t.id for t in item.targets if isinstance(t, ast.Name))
  for leaf in ast.walk(node):
    if (isinstance(leaf, ast.Attribute) and isinstance(leaf.ctx, ast.Store)
        and isinstance(leaf.value, ast.Name) and leaf.value.id == "self"):
      members.add(leaf.attr)
  return members


def external(dotted: str) -> object | None:
  """An outside library's attribute by dotted name, or None."""
  parts = dotted.split(".")
  for cut in range(len(parts), 0, -1):
    try:
      value = importlib.import_module(".".join(parts[:cut]))
    except ImportError:
      continue
    for part in parts[cut:]:
      if not hasattr(value, part):
        return None
      value = getattr(value, part)
    return value
  return None


def command_flags(paths: list[Path]) -> set[str]:
  """Flags defined by absl (`DEFINE_*("name"`) or argparse (`add_argument("--name"`) in files."""
  names = set()
  for path in paths:
    text = path.read_text()
    names.update(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", text))
    names.update(re.findall(r"add_argument\(\s*\"--([\w-]+)\"", text))
  return names


def repository_files(root: Path) -> list[str]:
  """The repository's files (tracked, or new and not ignored); outside git, every file but
  caches, virtual environments and run outputs."""
  try:
    return subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                          cwd=root, capture_output=True, text=True, check=True).stdout.split()
  except (OSError, subprocess.CalledProcessError):
    skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", *OUTPUT_ROOTS}
    return [str(path.relative_to(root)) for path in sorted(root.rglob("*")) if path.is_file()
            and not skip & set(path.relative_to(root).parts)]


class Repository:
  """Everything a doc may cite, collected once."""

  def __init__(self, root: Path):
    self.root = root
    self.files = [f for f in repository_files(root) if (root / f).exists()]
    self.dirs = {str(Path(f).parent) for f in self.files} | {
        str(p) for f in self.files for p in Path(f).parents if str(p) != "."}
    self.modules: dict[str, Module] = {}
    for file in self.files:  # the package's modules by dotted name; tests' by file stem
      if file.startswith(("eiw_flow_jax/", "tests/")) and file.endswith(".py"):
        parts = Path(file).with_suffix("").parts
        if parts[0] == "tests":
          parts = parts[1:]
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        self.modules[name] = Module(name, root / file)
    self.classes: dict[str, list[tuple[Module, ast.ClassDef]]] = {}
    for module in self.modules.values():
      for name, node in module.classes.items():
        self.classes.setdefault(name, []).append((module, node))
    self.config_fields = set()

    def walk(node, prefix):
      for key, value in node.items():
        path = f"{prefix}{key}"
        self.config_fields.add(path)
        if hasattr(value, "items"):
          walk(value, path + ".")

    walk(base_config(), "")
    self.flags = {  # per command: `python -m eiw_flow_jax.<cmd>`
        path.stem: command_flags([path]) | ABSL_FLAGS
        for path in (root / "eiw_flow_jax" / "commands").glob("*.py") if path.stem != "__init__"}
    self.script_flags = {}
    for folder in ("bench", "tools"):
      for path in (root / folder).glob("*.py"):
        imported = [root / folder / f"{m}.py" for m in re.findall(
            r"^\s*import (\w+)", path.read_text(), re.M) if (root / folder / f"{m}.py").exists()]
        self.script_flags[f"{folder}/{path.name}"] = command_flags([path, *imported]) | ABSL_FLAGS
    launch_words = set()
    for file in self.files:
      if file.startswith(("launch/", "bench/")) and file.endswith((".sh", ".sbatch")):
        launch_words.update(re.findall(r"--([a-z][\w-]*)", (root / file).read_text()))
    self.all_flags = set().union(*self.flags.values(), *self.script_flags.values(),
                                 launch_words, PYTEST_FLAGS)
    self.words = self._known_words()
    self.package_strings = {
        node.value for file in self.files
        if file.startswith(("eiw_flow_jax/", "configs/")) and file.endswith(".py")
        for node in ast.walk(ast.parse((root / file).read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        and "\n" not in node.value and len(node.value) < 100}

  def _known_words(self) -> set[str]:
    """Identifiers the repository's Python defines or uses, and its string values."""
    words = set(self.config_fields) | {f.split(".")[-1] for f in self.config_fields}
    words |= self.all_flags
    for file in self.files:
      path = Path(file)
      words.add(path.stem)
      if not file.endswith(".py") or file == THIS_FILE:  # its made-up names stay unknown
        continue
      for node in ast.walk(ast.parse((self.root / file).read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
          words.add(node.name)
        elif isinstance(node, ast.Name):
          words.add(node.id)
        elif isinstance(node, ast.Attribute):
          words.add(node.attr)
        elif isinstance(node, ast.arg):
          words.add(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
          words.add(node.arg)
        elif isinstance(node, ast.alias):
          words.update(node.name.split("."))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
          words.add(node.value)
          words.update(IDENTIFIER.findall(node.value) if len(node.value) < 80 else ())
    return words

  @functools.cached_property
  def source_text(self) -> str:
    return "\n".join((self.root / f).read_text(errors="replace") for f in self.files
                     if (f.endswith((".py", ".sh", ".sbatch", ".cfg", ".txt")) or f == ".ci/run")
                     and f != THIS_FILE)

  # -- paths

  def has_path(self, token: str) -> bool:
    path = token.rstrip("/")
    if token.endswith("/"):
      return path in self.dirs or any(d.endswith("/" + path) for d in self.dirs)
    return (path in self.files or path in self.dirs
            or any(f.endswith("/" + path) for f in self.files)
            or any(d.endswith("/" + path) for d in self.dirs))

  # -- dotted names

  def _module_scope(self, name: str) -> list[Module]:
    return [m for dotted, m in self.modules.items()
            if dotted == name or dotted.endswith("." + name)]

  def _class_has(self, module: Module, node: ast.ClassDef, member: str) -> bool:
    """Whether the class or one of its bases (in the package or outside) has `member`."""
    if member in class_members(node):
      return True
    for base in node.bases:
      head, _, rest = ast.unparse(base).partition(".")
      if head in module.classes and not rest:
        if self._class_has(module, module.classes[head], member):
          return True
        continue
      target = module.imports.get(head, f"builtins.{head}")
      dotted = f"{target}.{rest}" if rest else target
      owner, _, name = dotted.rpartition(".")
      if owner in self.modules and name in self.modules[owner].classes:
        if self._class_has(self.modules[owner], self.modules[owner].classes[name], member):
          return True
      elif hasattr(external(dotted), member):
        return True
    return False

  def _in_module(self, module: Module, parts: list[str]) -> bool:
    if not parts:
      return True
    head, rest = parts[0], parts[1:]
    if f"{module.name}.{head}" in self.modules:
      return self._in_module(self.modules[f"{module.name}.{head}"], rest)
    if head in module.classes:
      return self._in_class(module, module.classes[head], rest)
    if head in module.names:
      return not rest  # a function or value: nothing below it is checked
    if head in module.imports and module.path.name == "__init__.py":  # a re-export
      return self.resolves(f"{module.imports[head]}{''.join('.' + p for p in rest)}")
    if module.lazy:
      return external(".".join([module.name, *parts])) is not None
    return False

  def _in_class(self, module: Module, node: ast.ClassDef, parts: list[str]) -> bool:
    if not parts:
      return True
    return len(parts) == 1 and self._class_has(module, node, parts[0])

  def resolves(self, dotted: str) -> bool:
    """A chain of the package's modules, classes and members, or of an outside library."""
    parts = dotted.split(".")
    head, rest = parts[0], parts[1:]
    if head == "eiw_flow_jax":
      return self._in_module(self.modules[head], rest)
    for module in self._module_scope(head):
      if self._in_module(module, rest):
        return True
    for module, node in self.classes.get(head, []):
      if self._in_class(module, node, rest):
        return True
    for kind in INSTANCES.get(head, ()):
      if "." in kind:
        if external(f"{kind}.{'.'.join(rest)}") is not None:
          return True
      elif self.resolves(".".join([kind, *rest])):
        return True
    if head in LIBRARIES:
      return external(".".join([LIBRARIES[head], *rest])) is not None
    return head not in self.words and external(dotted) is not None  # e.g. what a module imports

  def is_config_field(self, dotted: str) -> bool:
    dotted = dotted.removeprefix("config.")
    return any(f == dotted or f.endswith("." + dotted) for f in self.config_fields)


@functools.cache
def repository() -> Repository:
  return Repository(ROOT)


# ----------------------------------------------------------------------------------------------
# Checking one document.


def doc_definitions(text: str) -> set[str]:
  """Names and string values the document's own python blocks define."""
  names = set()
  for language, _, body in fenced_blocks(text):
    if language != "python":
      continue
    try:
      tree = ast.parse(body)
    except SyntaxError:
      continue
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        names.add(node.name)
      elif isinstance(node, ast.Name):
        names.add(node.id)
      elif isinstance(node, ast.Constant) and isinstance(node.value, str):
        names.add(node.value)
  return names


def command_problems(command: str, repo: Repository) -> list[str]:
  """What is wrong with one shell command line (see the module docstring, rule 2)."""
  try:
    words = shlex.split(command, comments=True)
  except ValueError:
    return []
  while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # VAR=value prefixes
    words = words[1:]
  if not words:
    return []
  program, args = words[0], words[1:]
  flags: set[str] | None = None
  config_flags = False
  if program.endswith(("python", "python3")):
    if not args:
      return []
    if args[0] == "-c":  # a snippet: the package modules it imports must exist
      tree = ast.parse(args[1]) if len(args) > 1 else ast.Module(body=[], type_ignores=[])
      return [f"no module {node.module}.{alias.name}" for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                  "eiw_flow_jax") for alias in node.names
              if not repo.resolves(f"{node.module}.{alias.name}")]
    if args[0] == "-m":
      module, args = args[1], args[2:]
      if module == "pytest":
        return [f"no file {a}" for a in args if a.startswith("tests/")
                and not repo.has_path(a.split("::")[0])]
      if not module.startswith("eiw_flow_jax") or "<" in module:
        return []
      command = module.split(".")[-1]
      if command not in repo.flags:
        return [f"no command {module}"]
      flags, config_flags = repo.flags[command], "config" in repo.flags[command]
    else:
      script, args = args[0], args[1:]
      if script not in repo.script_flags:
        return [f"no script {script}"]
      flags = repo.script_flags[script]
  elif program.startswith(("bench/", "launch/", "tools/", ".ci/")):
    if not repo.has_path(program):
      return [f"no script {program}"]
  else:
    return []  # pip, git, ...: not ours
  problems = []
  for arg in args:
    arg = arg.strip("[]")  # optional flags in a usage line
    name, _, value = arg.partition("=")
    if arg.startswith("--xla_") or not arg.startswith("-"):
      if re.fullmatch(r"(configs|tests|bench|tools|docs)/[\w./-]+", arg.split(":")[0]) and (
          not repo.has_path(arg.split(":")[0])):
        problems.append(f"no file {arg}")
      continue
    name = name.lstrip("-")
    if name.startswith("config.") and config_flags:
      if "<" not in name and not repo.is_config_field(name):
        problems.append(f"no config field {name}")
    elif flags is not None and not (name in flags or (
        name.startswith("no") and name[2:] in flags)):
      problems.append(f"no flag --{name}")
    if name == "config" and value and not PLACEHOLDER.search(value) and value != "...":
      if not repo.has_path(value.split(":")[0]):
        problems.append(f"no config file {value}")
  return problems


def token_problem(token: str, repo: Repository, defined: set[str]) -> str | None:
  """Why `token` names nothing in the repository, or None (see the module docstring)."""
  token = token.strip()
  if token in EXTERNAL or token in SHOWN_ERRORS or token in defined:
    return None
  if token in repo.package_strings:  # a value the package holds: a TFDS name, a glibc tunable
    return None
  if token.startswith(("python ", "python3 ", ".venv/bin/python ", "bench/", "tools/",
                       "launch/", "pip ")) and " " in token:
    problems = command_problems(token, repo)
    return "; ".join(problems) or None
  if re.match(r"--[A-Za-z]|-[A-Za-z]( |$)", token):
    name = token.split("=")[0].lstrip("-")
    if " " in token:  # several flags
      return "; ".join(filter(None, (token_problem(t, repo, defined) for t in token.split()))) or (
          None)
    if name.startswith("xla_") or "<" in name:
      return None
    if name.startswith("config."):
      return None if repo.is_config_field(name) else f"no config field {name}"
    if name in repo.all_flags or (name.startswith("no") and name[2:] in repo.all_flags):
      return None
    return f"no flag --{name}"
  call = re.match(r"(@?[\w.]+)\(", token)
  if call:
    return token_problem(call.group(1).lstrip("@"), repo, defined)
  assignment = re.fullmatch(r"([\w.]+) ?= ?\S.*", token)
  if assignment:
    return token_problem(assignment.group(1), repo, defined)
  quoted = re.fullmatch(r"([\"'])([\w.-]+)\1", token)
  if quoted:
    value = quoted.group(2)
    return None if value in repo.package_strings or value in repo.words or value in defined else (
        f"no value {value!r} in the code")
  if "://" in token or token.startswith(("/", "~", "$")):
    return None
  if " " not in token and ("/" in token or token.endswith(FILE_SUFFIXES)) and not re.fullmatch(
      r"\.\w+", token):  # (`.pt`: a file type, not a file)
    path, _, test = token.partition("::")
    if token.split("/")[0] in TENSORBOARD_ROOTS and not repo.has_path(path):
      last = token.rstrip("/").split("/")[-1]
      return None if PLACEHOLDER.search(last) or last in repo.words else (
          f"no TensorBoard tag {token}")
    if PLACEHOLDER.search(path) or path.split("/")[0] in OUTPUT_ROOTS | OUTSIDE_PATH_ROOTS:
      return None
    path = path.split(":")[0]
    if not repo.has_path(path):
      return f"no file or folder {path}"
    if test:
      module = repo.modules.get(Path(path).stem)
      if module is None or test.split("[")[0] not in module.names:
        return f"no test {test} in {path}"
    return None
  if DOTTED.fullmatch(token):
    if repo.is_config_field(token) or repo.resolves(token):
      return None
    return f"no module, class, member or config field {token}"
  if IDENTIFIER.fullmatch(token):
    if len(token) <= 2 or token in GREEK or re.fullmatch(r"[A-Za-z]+_[A-Za-z0-9]", token) or (
        re.fullmatch(r"[A-Za-z]_[A-Za-z0-9]{1,2}", token)):
      return None  # math notation: x, C, theta, x_a, IWBO_k
    if token[0].isupper() and not token.isupper():
      if token in repo.classes or token in repo.words:
        return None
      if any(external(f"{library}.{token}") is not None for library in CLASS_LIBRARIES):
        return None
      return f"no class {token}"
    if token.isupper() or "_" in token and token.upper() == token:
      return None if token in repo.words or re.search(
          rf"\b{token}\b", repo.source_text) else f"no name {token} in the sources"
    return None if token in repo.words else f"no name {token}"
  return None  # an expression, a phrase


def doc_problems(text: str, repo: Repository, name: str = "doc") -> list[str]:
  defined = doc_definitions(text)
  problems = []
  for line, token in code_spans(text):
    why = token_problem(token, repo, defined)
    if why:
      problems.append(f"{name}:{line}: `{token}`: {why}")
  for language, start, body in fenced_blocks(text):
    if language not in ("bash", "sh", ""):
      continue
    for offset, command in enumerate(body.replace("\\\n", " ").splitlines()):
      for why in command_problems(command, repo):
        problems.append(f"{name}:{start + offset}: `{command.strip()[:80]}`: {why}")
  return problems


# ----------------------------------------------------------------------------------------------
# The tests.


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_docs_cite_only_what_exists(doc):
  problems = doc_problems(doc.read_text(), repository(), str(doc.relative_to(ROOT)))
  assert problems == [], "\n" + "\n".join(problems)


def test_the_checker_reports_made_up_names():
  made_up = {
      "`eiw_flow_jax.model.flux`": "no module, class, member or config field",
      "`model/flux.py`": "no file or folder",
      "`bench/speed.py`": "no file or folder",
      "`train_loop.train_forever`": "no module, class, member or config field",
      "`Flow.teleport`": "no module, class, member or config field",
      "`MultiScaleFlux`": "no class",
      "`frobnicate_flow(config)`": "no name",
      "`model.eiw.temperature`": "no module, class, member or config field",
      "`--config.model.depth=3`": "no config field",
      "`--learning_rate_decay`": "no flag",
      "`data.DATASETS`": "no module, class, member or config field",
      "`tests/test_model.py::test_flux`": "no test test_flux",
      "`\"per_fortnight\"`": "no value",
      "`EIW_FLOW_JAX_TURBO`": "no name",
  }
  text = "\n".join(f"- {token}" for token in made_up)
  text += ("\n\n```bash\npython -m eiw_flow_jax.main --config=configs/digits.py --speed=2 \\\n"
           "    --config.model.warp=1\npython -m eiw_flow_jax.train --config=configs/nope.py\n"
           "python bench/speed.py\n```\n")
  problems = doc_problems(text, repository())
  for token, why in made_up.items():
    assert any(token in p and why in p for p in problems), (token, problems)
  for why in ("no flag --speed", "no config field config.model.warp",
              "no command eiw_flow_jax.train", "no script bench/speed.py"):
    assert any(why in p for p in problems), (why, problems)
  assert len(problems) == len(made_up) + 4, problems
  # Real names of each kind pass.
  real = ("`eiw_flow_jax.model.flow`", "`model/flow.py`", "`train_loop.train`", "`Flow.sample`",
          "`MultiScaleFlow`", "`build_flow(config)`", "`model.eiw.mode`", "`jax.jit`",
          "`--config.model.dtype=bfloat16`", "`--mode=eval`", "`registry.DATASETS`",
          "`tests/conftest.py`", "`\"remat\"`", "`EIW_FLOW_JAX_HOST_MALLOC=0`", "`optax.adam`",
          "`configs/cifar10.py:v5e_16`", "`shuffle/level0/kept_channels`")
  assert doc_problems("\n".join(real), repository()) == []


def test_published_numbers_are_the_table_commands():
  """docs/formulation.md's table of published bits/dim is `table.BENCHMARKS`, row for row."""
  text = (ROOT / "docs" / "formulation.md").read_text()
  section = text.split("## Published bits/dim to compare against")[1]
  header, _, *rows = [line for line in section.splitlines() if line.startswith("|")]
  models = [cell.strip() for cell in header.strip("|").split("|")][1:]
  assert tuple(models) == table.MODELS
  documented = {}
  for row in rows:
    title, *cells = [cell.strip() for cell in row.strip("|").split("|")]
    documented[title] = {m: float(c) for m, c in zip(models, cells, strict=True) if c}
  assert documented == {b.title: {p.model: p.bpd for p in b.published} for b in table.BENCHMARKS}


# Files another change owns that still name the old design note; each entry must still match
# (so that it is removed with the fix), and nothing else may.
OWNED_ELSEWHERE: set[str] = set()


def test_nothing_points_outside_the_repository():
  """No path into a sibling `shared/` folder or to the design note it held: a clone has
  neither; the formulation is docs/formulation.md, MNIST's files come from the user."""
  needles = ("../" + "shared", "shared/" + "design", "EIW_FLOW" + ".md",
             "shared/" + "data/mnist")  # (split, so that this file does not match itself)
  found = set()
  for file in repository().files:
    if file.endswith((".py", ".md", ".ipynb", ".sh", ".sbatch", ".cfg", ".toml", ".txt")):
      text = (ROOT / file).read_text(errors="replace")
      found.update(file for needle in needles if needle in text)
  assert found == OWNED_ELSEWHERE


def test_docs_page_table_lists_every_page():
  """The README's documentation table names every page in docs/."""
  readme = (ROOT / "README.md").read_text()
  for page in sorted((ROOT / "docs").glob("*.md")):
    assert f"[docs/{page.name}](docs/{page.name})" in readme, page.name
  assert os.path.isdir(ROOT / "docs" / "figures")
