"""The package's structure: imports run one way (no module graph cycle, not even through imports inside
functions), every module imports alone in a fresh interpreter, and the public names HF-style users try first."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "telechat_ms"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Package modules that `name` imports anywhere in its file (module level or inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith("telechat_ms"):
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    # a package's face (__init__) re-exports its members: edges into a package stand for its members
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
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

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_module_graph_has_no_cycle():
    graph = _graph()
    # the top-level face hands out the public classes lazily; it is nobody's dependency inside the package
    graph.pop("telechat_ms", None)
    for deps in graph.values():
        deps.discard("telechat_ms")
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_every_module_imports_alone_in_a_fresh_interpreter():
    names = [n for n in MODULES if not n.startswith("telechat_ms.reference") or n == "telechat_ms.reference"]
    code = ("import importlib, sys\n"
            "failed = []\n"
            f"for name in {names!r}:\n"
            "    for m in [m for m in sys.modules if m.startswith('telechat_ms')]:\n"
            "        del sys.modules[m]\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except Exception as exc:\n"
            "        failed.append(f'{name}: {type(exc).__name__}: {exc}')\n"
            "print('\\n'.join(failed))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=PACKAGE.parent, env={**os.environ, "GLOG_v": "3"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "", proc.stdout


def test_public_names_and_a_quiet_terminal(tmp_path):
    """`from telechat_ms import ...` works, and importing the model prints nothing on stdout and writes no
    ./output/log into the working directory (MindFormers' log goes to a cache or run directory)."""
    code = ("from telechat_ms import TeleChatConfig, TeleChatForCausalLM, TeleChatTokenizer\n"
            "cfg = TeleChatConfig.preset('tiny', n_layer=1)\n"
            "model = TeleChatForCausalLM(cfg)\n"
            "print('names', TeleChatTokenizer.__name__, type(model).__name__)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("LOG_MF_PATH", "GLOG_v")}
    env["HOME"] = str(tmp_path / "home")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**env, "PYTHONPATH": str(PACKAGE.parent)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "names TeleChatTokenizer TeleChatForCausalLM\n"
    assert "hyper_parallel" not in proc.stderr
    assert not (tmp_path / "output").exists()
    assert (tmp_path / "home" / ".cache" / "telechat_ms" / "mindformers_log").is_dir()


@pytest.mark.parametrize("module", ["telechat_ms.model.telechat", "telechat_ms.model.layers"])
def test_the_model_does_not_import_features_above_it(module):
    """ARCHITECTURE: the model knows nothing of data/, train/, serve/ or the CLI (generation sits below it)."""
    graph = _graph()
    above = ("telechat_ms.data", "telechat_ms.train", "telechat_ms.serve", "telechat_ms.cli",
             "telechat_ms.commands", "telechat_ms.parallel")
    assert not [d for d in graph[module] if d.startswith(above)]
