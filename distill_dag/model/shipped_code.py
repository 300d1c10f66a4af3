"""The student's modeling code, made self-contained to ship beside the weights.

:func:`modeling_sources` / :func:`write_modeling_code`: the student's modules (``distill_dag.model.retnet``
and the retention kernels it calls) copied beside the weights as ``modeling_retnet.py`` and ``retention*.py``.
Each ``from distill_dag.X import ...`` becomes ``from .<file> import ...``; an import of any other package
than torch, transformers, huggingface_hub and the standard library (triton, fla: optional backends, imported
only when chosen) is wrapped in ``try: ... except ImportError: raise``, which behaves exactly as before but
keeps transformers' static requirement check (``check_imports``, which skips ``try`` blocks) from asking
for it. The result imports nothing of ``distill_dag``; this is checked on every write.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

from distill_dag import __version__
from distill_dag.io import write_bytes_atomic

# distill_dag module -> file (without .py) in the checkpoint folder; every distill_dag import of a shipped
# module must be in here (else ShippedCodeError names it)
SHIPPED_MODULES: dict[str, str] = {
    "distill_dag.model.retnet": "modeling_retnet",
    "distill_dag.kernels.retention": "retention",
    "distill_dag.kernels.retention.reference": "retention_reference",
    "distill_dag.kernels.retention.chunk": "retention_chunk",
    "distill_dag.kernels.retention.triton_chunk": "retention_triton",
}
MODELING_FILE = "modeling_retnet"
AUTO_MAP = {
    "AutoConfig": f"{MODELING_FILE}.RetNetConfig",
    "AutoModel": f"{MODELING_FILE}.RetNetModel",
    "AutoModelForCausalLM": f"{MODELING_FILE}.RetNetForCausalLM",
}
# what the shipped code may require (transformers' check_imports): everything else is optional
REQUIRED_PACKAGES = frozenset({"torch", "transformers", "huggingface_hub"})


class ShippedCodeError(RuntimeError):
    """The student's modules cannot be shipped self-contained (the message names the module and import)."""


def _allowed(top: str) -> bool:
    return top in REQUIRED_PACKAGES or top in sys.stdlib_module_names or top == "__future__"


def _rewrite(src: str, module: str) -> str:
    """``src`` of ``module`` with distill_dag imports made relative and optional imports wrapped (module doc)."""
    tree = ast.parse(src)
    lines = src.splitlines(keepends=True)
    edits: list[tuple[int, int, list[str]]] = []  # (first line index, end line index exclusive, new lines)

    def where(node: ast.stmt) -> str:
        return f"{module} line {node.lineno}"

    def alone(node: ast.stmt) -> None:
        before = lines[node.lineno - 1][: node.col_offset]
        if before.strip():
            raise ShippedCodeError(f"{where(node)}: put the import on a line of its own to ship it")

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise ShippedCodeError(f"{where(node)}: relative import; import shipped modules by their full name")
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        tops = {n.split(".")[0] for n in names}
        if "distill_dag" in tops:
            if not isinstance(node, ast.ImportFrom) or node.module not in SHIPPED_MODULES:
                raise ShippedCodeError(
                    f"{where(node)} imports {', '.join(names)}, which the checkpoint does not ship: use "
                    f"`from <module> import ...` of one of {', '.join(SHIPPED_MODULES)} (or add the module to "
                    "distill_dag.model.shipped_code.SHIPPED_MODULES; it must itself import no other distill_dag module)"
                )
            alone(node)
            first = lines[node.lineno - 1]
            head = re.compile(rf"from\s+{re.escape(node.module)}\s+import\b")
            if not head.search(first):
                raise ShippedCodeError(f"{where(node)}: write `from {node.module} import` on one line to ship it")
            new = head.sub(f"from .{SHIPPED_MODULES[node.module]} import", first, count=1)
            edits.append((node.lineno - 1, node.lineno, [new]))
        elif not all(_allowed(t) for t in tops):
            alone(node)
            pad = " " * node.col_offset
            body = lines[node.lineno - 1 : node.end_lineno]
            body = ["    " + body[0][node.col_offset:] if i == 0 else "    " + line
                    for i, line in enumerate(body)]
            body[0] = pad + body[0]
            optional = ", ".join(sorted(t for t in tops if not _allowed(t)))
            edits.append((node.lineno - 1, node.end_lineno, [
                f"{pad}try:  # {optional}: an optional backend, required only when it is chosen\n",
                *body,
                f"{pad}except ImportError:\n",
                f"{pad}    raise\n",
            ]))
    for start, end, new in sorted(edits, reverse=True):
        lines[start:end] = new
    return "".join(lines)


def modeling_sources() -> dict[str, str]:
    """``{file name: source}`` of the self-contained modeling code (see the module doc)."""
    out = {}
    for module, name in SHIPPED_MODULES.items():
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.origin:
            raise ShippedCodeError(f"{module} (listed in SHIPPED_MODULES) cannot be found")
        origin = Path(spec.origin)
        rel = "/".join(module.split(".")) + ("/__init__.py" if origin.name == "__init__.py" else ".py")
        header = (f"# Shipped with the checkpoint by distill-dag {__version__}: a copy of {rel}, with the imports of\n"
                  "# its sibling modules made relative. It imports only torch, transformers and the files beside it.\n")
        out[f"{name}.py"] = header + _rewrite(origin.read_text(encoding="utf-8"), module)
    return out


def write_modeling_code(folder: str | Path) -> list[str]:
    """Write :func:`modeling_sources` into ``folder`` and check that transformers asks for no other package."""
    from transformers.dynamic_module_utils import get_imports

    folder = Path(folder)
    names = []
    for name, src in modeling_sources().items():
        write_bytes_atomic(folder / name, src.encode())
        extra = sorted(t for t in get_imports(folder / name) if not _allowed(t))
        if extra:
            raise ShippedCodeError(f"{folder / name} would require {', '.join(extra)} to load with trust_remote_code")
        names.append(name)
    return names

