"""Static checks of the Dockerfile against the package it builds (no docker needed).

The image is only right if its base vLLM is the one pyproject.toml pins (the
extension is compiled against that vLLM's torch), if it installs this checkout
rather than something from PyPI, and if the plugin entry point that makes
``vllm serve --enable-compression`` work is declared and points at real code.
Each check is a function returning the problems it found, so the tests below can
also feed it broken inputs and show that it does catch them.
"""

from __future__ import annotations

import ast
import fnmatch
import posixpath
import re
import shlex
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10; pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = "vllm/vllm-openai"
PLUGIN_GROUP = "vllm.general_plugins"
PLUGIN_NAME = "kvcompress"
PLUGIN_TARGET = "vllm_kvcompress.plugin:register"
# What `pip install .` reads; excluding any of them from the build context breaks the image.
BUILD_INPUTS = ("pyproject.toml", "setup.py", "CMakeLists.txt", "README.md",
                "cmake/kvcompress_utils.cmake", "csrc/torch_bindings.cpp",
                "vllm_kvcompress/__init__.py", "vllm_kvcompress/codec.py")


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue  # a comment, also inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            instructions.append((keyword.upper(), args.strip()))
    return instructions


def load_pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def vllm_requirement(pyproject: dict) -> Requirement:
    reqs = [Requirement(r) for r in pyproject["project"]["dependencies"]]
    matches = [r for r in reqs if r.name == "vllm"]
    assert len(matches) == 1, f"expected one vllm dependency, got {matches}"
    return matches[0]


def base_image_problems(instructions: list[tuple[str, str]], pyproject: dict) -> list[str]:
    froms = [args for kw, args in instructions if kw == "FROM"]
    if not froms:
        return ["the Dockerfile has no FROM"]
    image = froms[-1].split()[0]  # the final stage is the image that ships
    match = re.fullmatch(re.escape(BASE_IMAGE) + r":v(\d+\.\d+\.\d+)", image)
    if match is None:
        return [f"final FROM is {image!r}, expected {BASE_IMAGE}:vX.Y.Z"]
    tag = Version(match.group(1))
    pin = vllm_requirement(pyproject).specifier
    specs = list(pin)
    if len(specs) != 1 or specs[0].operator != "==":
        return [f"pyproject.toml should pin vllm with one '==' specifier, got '{pin}'"]
    if tag not in pin:
        return [f"base image is vLLM {tag}, pyproject.toml pins vllm{pin}"]
    return []


def shell_commands(script: str) -> list[list[str]]:
    """The words of each simple command of a RUN line (split at ``&&``, ``;``, ``|``)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def workdir_after(instructions: list[tuple[str, str]], index: int) -> str:
    """The working directory in effect for instruction ``index`` (Docker's default is /)."""
    cwd = "/"
    for kw, args in instructions[:index]:
        if kw == "WORKDIR":
            cwd = posixpath.normpath(posixpath.join(cwd, args))
    return cwd


def install_problems(instructions: list[tuple[str, str]]) -> list[str]:
    """The build context must be copied in and ``pip install --no-build-isolation``ed from there."""
    copied: set[str] = set()
    for i, (kw, args) in enumerate(instructions):
        if kw in ("COPY", "ADD") and not args.startswith("--"):
            *sources, dest = shlex.split(args)
            if sources == ["."]:
                copied.add(posixpath.normpath(posixpath.join(workdir_after(instructions, i), dest)))
    if not copied:
        return ["no COPY/ADD of the build context ('.')"]
    for i, (kw, args) in enumerate(instructions):
        if kw != "RUN":
            continue
        cwd = workdir_after(instructions, i)
        for words in shell_commands(args):
            pip = [j for j, w in enumerate(words[:-1])
                   if w in ("pip", "pip3") and words[j + 1] == "install"]
            if not pip:
                continue
            rest = words[pip[0] + 2:]
            targets = {posixpath.normpath(posixpath.join(cwd, w))
                       for w in rest if not w.startswith("-")}
            if targets & copied and "--no-build-isolation" in rest:
                return []
    return [f"no RUN 'pip install --no-build-isolation' of the copied context {sorted(copied)}"]


def dockerignore_problems(patterns_text: str) -> list[str]:
    """Build inputs that .dockerignore would drop from the context (last match wins)."""
    patterns = [p.strip() for p in patterns_text.splitlines()
                if p.strip() and not p.lstrip().startswith("#")]

    def excluded(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        result = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            pattern = pattern.lstrip("!").strip("/")
            if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
                result = not negate
        return result

    return [f".dockerignore excludes {path}" for path in BUILD_INPUTS if excluded(path)]


def arch_list_problems(instructions: list[tuple[str, str]], cmake_text: str) -> list[str]:
    """The image's default GPU targets are the ones the CMake build defaults to."""
    cmake_default = re.search(r'set\(KVCOMPRESS_DEFAULT_ARCHS "([^"]*)"\)', cmake_text)
    if cmake_default is None:
        return ["KVCOMPRESS_DEFAULT_ARCHS not found in cmake/kvcompress_utils.cmake"]
    runs = " ".join(args for kw, args in instructions if kw == "RUN")
    passed = re.search(r'TORCH_CUDA_ARCH_LIST="\$\{(\w+)\}"', runs)
    if passed is None:
        return ['no RUN sets TORCH_CUDA_ARCH_LIST="${<build arg>}"']
    defaults = {}
    for kw, args in instructions:
        if kw == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            defaults[name] = value.strip('"')
    default = defaults.get(passed.group(1))
    if default != cmake_default.group(1):
        return [(f"ARG {passed.group(1)} defaults to {default!r}, "
                 f"the CMake build to {cmake_default.group(1)!r}")]
    return []


def entrypoint_problems(instructions: list[tuple[str, str]]) -> list[str]:
    """``docker run IMAGE MODEL --flags`` must mean ``vllm serve MODEL --flags``.

    The base image's entrypoint cannot be seen from here, so the Dockerfile restates it.
    """
    entrypoints = [args for kw, args in instructions if kw == "ENTRYPOINT"]
    if not entrypoints:
        return ['no ENTRYPOINT; expected ["vllm", "serve"]']
    if ast.literal_eval(entrypoints[-1]) != ["vllm", "serve"]:
        return [f'ENTRYPOINT is {entrypoints[-1]}, expected ["vllm", "serve"]']
    return []


def entry_point_problems(pyproject: dict) -> list[str]:
    """pyproject.toml declares the plugin vLLM loads in every process."""
    group = pyproject.get("project", {}).get("entry-points", {}).get(PLUGIN_GROUP, {})
    target = group.get(PLUGIN_NAME)
    if target != PLUGIN_TARGET:
        return [(f'[project.entry-points."{PLUGIN_GROUP}"] {PLUGIN_NAME} is {target!r}, '
                 f"expected {PLUGIN_TARGET!r}")]
    return []


def target_problems(target: str, root: Path) -> list[str]:
    """``module:function`` names a module file under ``root`` with that top-level function."""
    match = re.fullmatch(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*)", target)
    if match is None:
        return [f"{target!r} is not of the form module:function"]
    module, function = match.groups()
    path = root / (module.replace(".", "/") + ".py")
    if not path.is_file():
        return [f"{path.relative_to(root)} (module {module}) does not exist"]
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            args = node.args
            required = len(args.posonlyargs) + len(args.args) - len(args.defaults)
            required += sum(default is None for default in args.kw_defaults)
            if required:
                # vLLM's load_general_plugins() calls every plugin with no arguments.
                return [f"{module}.{function} must be callable with no arguments"]
            return []
    return [f"{path.relative_to(root)} defines no top-level def {function}("]


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


def test_base_image_is_the_pinned_vllm(dockerfile: list[tuple[str, str]]) -> None:
    assert base_image_problems(dockerfile, load_pyproject()) == []


def test_installs_this_checkout(dockerfile: list[tuple[str, str]]) -> None:
    assert install_problems(dockerfile) == []
    assert dockerignore_problems((ROOT / ".dockerignore").read_text()) == []


def test_default_gpu_targets_match_the_cmake_build(dockerfile: list[tuple[str, str]]) -> None:
    cmake = (ROOT / "cmake" / "kvcompress_utils.cmake").read_text()
    assert arch_list_problems(dockerfile, cmake) == []


def test_entrypoint_is_vllm_serve(dockerfile: list[tuple[str, str]]) -> None:
    assert entrypoint_problems(dockerfile) == []


def test_plugin_entry_point_is_declared() -> None:
    assert entry_point_problems(load_pyproject()) == []


def test_plugin_entry_point_resolves() -> None:
    assert target_problems(PLUGIN_TARGET, ROOT) == []


# The checks above must be able to fail: each one on an input with the fault it looks for.

GOOD = """\
FROM vllm/vllm-openai:v0.26.0
ARG archs="8.0 8.9 9.0 10.0+PTX"
WORKDIR /src
COPY . .
RUN python3 -m pip install cmake \\
    && TORCH_CUDA_ARCH_LIST="${archs}" python3 -m pip install --no-build-isolation .
ENTRYPOINT ["vllm", "serve"]
"""
PYPROJECT = {"project": {"dependencies": ["vllm==0.26.*"],
                         "entry-points": {PLUGIN_GROUP: {PLUGIN_NAME: PLUGIN_TARGET}}}}
CMAKE = 'set(KVCOMPRESS_DEFAULT_ARCHS "8.0 8.9 9.0 10.0+PTX")'


def test_checks_accept_a_good_dockerfile() -> None:
    instructions = parse_dockerfile(GOOD)
    assert base_image_problems(instructions, PYPROJECT) == []
    assert install_problems(instructions) == []
    assert arch_list_problems(instructions, CMAKE) == []
    assert entrypoint_problems(instructions) == []


@pytest.mark.parametrize("old, new", [
    ("v0.26.0", "v0.25.1"),
    ("vllm/vllm-openai:v0.26.0", "vllm/vllm-openai:latest"),
    ("vllm/vllm-openai", "nvidia/cuda"),
])
def test_base_image_check_catches(old: str, new: str) -> None:
    assert base_image_problems(parse_dockerfile(GOOD.replace(old, new)), PYPROJECT)


def test_base_image_check_needs_an_exact_pin() -> None:
    loose = {"project": {"dependencies": ["vllm>=0.20"]}}
    assert base_image_problems(parse_dockerfile(GOOD), loose)


@pytest.mark.parametrize("old, new", [
    ("COPY . .", "COPY csrc csrc"),
    ("--no-build-isolation .", "--no-build-isolation vllm-kvcompress"),
    ("--no-build-isolation .", "."),
    ("COPY . .", "COPY . /elsewhere"),
])
def test_install_check_catches(old: str, new: str) -> None:
    assert install_problems(parse_dockerfile(GOOD.replace(old, new)))


@pytest.mark.parametrize("ignore", ["csrc", "*.toml", "README.md", "vllm_kvcompress/*.py"])
def test_dockerignore_check_catches(ignore: str) -> None:
    assert dockerignore_problems(f"# comment\n.git\n{ignore}\n")


def test_dockerignore_check_honours_exceptions() -> None:
    assert dockerignore_problems("*.md\n!README.md\n") == []


def test_arch_list_check_catches() -> None:
    changed = GOOD.replace('archs="8.0 8.9 9.0 10.0+PTX"', 'archs="9.0"')
    assert arch_list_problems(parse_dockerfile(changed), CMAKE)
    assert arch_list_problems(parse_dockerfile(GOOD.replace('="${archs}"', "=9.0")), CMAKE)


def test_entrypoint_check_catches() -> None:
    changed = GOOD.replace('["vllm", "serve"]', '["python3", "-m", "vllm.entrypoints.api_server"]')
    assert entrypoint_problems(parse_dockerfile(changed))
    assert entrypoint_problems(parse_dockerfile(GOOD.replace('ENTRYPOINT ["vllm", "serve"]', "")))


def test_entry_point_check_catches() -> None:
    assert entry_point_problems(PYPROJECT) == []
    assert entry_point_problems({"project": {}})
    renamed = {"project": {"entry-points": {PLUGIN_GROUP: {"kvcompress-plugin": PLUGIN_TARGET}}}}
    assert entry_point_problems(renamed)
    elsewhere = {"project": {"entry-points": {PLUGIN_GROUP: {PLUGIN_NAME: "pkg.plugin:register"}}}}
    assert entry_point_problems(elsewhere)


@pytest.mark.parametrize("target, source", [
    (PLUGIN_TARGET, ""),
    (PLUGIN_TARGET, "def other() -> None:\n    pass\n"),
    (PLUGIN_TARGET, "class C:\n    def register(self) -> None:\n        pass\n"),
    (PLUGIN_TARGET, "def register(config) -> None:\n    pass\n"),
    ("vllm_kvcompress.plugin:regsiter", "def register() -> None:\n    pass\n"),
    ("vllm_kvcompress.plugin.register", "def register() -> None:\n    pass\n"),
    ("vllm_kvcompress.plugins:register", "def register() -> None:\n    pass\n"),
])
def test_target_check_catches(target: str, source: str, tmp_path: Path) -> None:
    (tmp_path / "vllm_kvcompress").mkdir()
    (tmp_path / "vllm_kvcompress" / "plugin.py").write_text(source)
    assert target_problems(target, tmp_path)


def test_target_check_accepts_a_plugin(tmp_path: Path) -> None:
    (tmp_path / "vllm_kvcompress").mkdir()
    (tmp_path / "vllm_kvcompress" / "plugin.py").write_text(
        "def register(*, verbose: bool = False) -> None:\n    pass\n")
    assert target_problems(PLUGIN_TARGET, tmp_path) == []
