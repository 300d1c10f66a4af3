"""distill-dag: distill a transformer teacher into a RetNet student, as a Dagster pipeline.

Importing the package registers the RetNet student with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(student_dir)`` works after ``import distill_dag``. The
registration waits for transformers itself: it runs at once when transformers is already imported,
else right after transformers (or the student module) is first imported, so ``import distill_dag``
(and ``distill --help``) does not pay for torch and transformers.

Importing it also tells glibc to reuse freed memory for large CPU tensors instead of unmapping it
(:func:`distill_dag.device.keep_freed_memory`; ``DISTILL_DAG_MALLOC=system`` opts out).
"""

__version__ = "0.1.0"

import importlib.abc as _abc
import sys as _sys

from distill_dag.device import keep_freed_memory as _keep_freed_memory
from distill_dag.model import register_auto_classes

_keep_freed_memory()

_WATCH = ("transformers", "distill_dag.model.retnet")


def _register() -> None:
    register_auto_classes()
    _sys.meta_path[:] = [f for f in _sys.meta_path if not isinstance(f, _RegisterAfterImport)]


class _RegisterAfterImport(_abc.MetaPathFinder):
    """Wraps the loader of transformers and of the student module: once one of them has finished
    loading (and the student module is not half-imported), the Auto classes are registered."""

    def find_spec(self, name, path=None, target=None):
        if name not in _WATCH:
            return None
        for finder in _sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec

        class _Loader(_abc.Loader):
            def __getattr__(self, attr):  # get_resource_reader, is_package, ...: the real loader's
                return getattr(loader, attr)

            def create_module(self, s):
                return loader.create_module(s)

            def exec_module(self, module):
                loader.exec_module(module)
                if name == "transformers" and "distill_dag.model.retnet" in _sys.modules:
                    return  # the student module is importing transformers: register when it is done
                _register()

        spec.loader = _Loader()
        return spec


if "transformers" in _sys.modules:
    _register()
else:
    _sys.meta_path.insert(0, _RegisterAfterImport())
