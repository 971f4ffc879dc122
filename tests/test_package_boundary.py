"""One core, one thin package per host: the core imports no host, no host imports another."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "oms_ext"
#: The host packages and the host libraries only they may import.
HOSTS = {
    "oms_ext.webui": ("modules", "backend", "gradio", "launch", "ldm_patched"),
    "oms_ext.comfy": ("comfy", "comfy_extras", "folder_paths", "nodes", "server", "latent_preview"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function, as absolute names."""
    names = set()
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path.parent)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _owner(module: str) -> str | None:
    return next((h for h in HOSTS if module == h or module.startswith(h + ".")), None)


def _violations() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module, owner = _module_name(path), _owner(_module_name(path))
        for name in sorted(_imports(path)):
            target = _owner(name)
            if target is not None and target != owner:
                bad.append(f"{module} imports {name}")
            for host, libraries in HOSTS.items():
                if host != owner and name.split(".")[0] in libraries:
                    bad.append(f"{module} imports {name}, a library of the {host} host")
    return bad


def test_the_core_imports_no_host_and_no_host_imports_another() -> None:
    assert _violations() == []


def test_the_boundary_check_sees_a_forbidden_import(tmp_path, monkeypatch) -> None:
    # The rule above must be able to fail: a core module importing a host package is caught.
    fake = tmp_path / "oms_ext"
    (fake / "runtime").mkdir(parents=True)
    (fake / "runtime" / "x.py").write_text("def f():\n    from oms_ext.webui import glue\n")
    (fake / "runtime" / "y.py").write_text("import folder_paths\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert _violations() == [
        "oms_ext.runtime.x imports oms_ext.webui",
        "oms_ext.runtime.x imports oms_ext.webui.glue",
        "oms_ext.runtime.y imports folder_paths, a library of the oms_ext.comfy host",
    ]


def test_importing_oms_ext_loads_no_webui_or_gradio_module() -> None:
    code = (
        "import sys, importlib, pkgutil, oms_ext\n"
        "for m in pkgutil.walk_packages(oms_ext.__path__, 'oms_ext.'):\n"
        "    if not m.name.startswith('oms_ext.comfy'):\n"
        "        importlib.import_module(m.name)\n"
        "bad = [n for n in sys.modules if n.split('.')[0] in "
        "('modules', 'backend', 'gradio', 'launch', 'ldm_patched', 'comfy', 'folder_paths')]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""
