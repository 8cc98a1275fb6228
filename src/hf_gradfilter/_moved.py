"""Old flat module paths (``hf_gradfilter.trainer``, ``hf_gradfilter.hub`` ...) still import.

The modules now live in one subpackage per stage (see the README's Layout). Code written against
the flat layout keeps working: importing an old path gives the moved module itself (the same
object, so patching an attribute through either path patches both). New code should use the new
paths; `MOVED` is the table.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "baselines": "scores.baselines",
    "config": "proxy.config",
    "demo_data": "demo.data",
    "finetune": "target.finetune",
    "formatting": "data.formatting",
    "hub": "publish.hub",
    "judge": "target.judge",
    "metrics": "scores.metrics",
    "norms": "proxy.norms",
    "pipeline": "run.pipeline",
    "record": "proxy.record",
    "report": "run.report",
    "scorer": "scores.scorer",
    "scoring": "scores.scoring",
    "sweep": "scores.sweep",
    "tiny": "demo.tiny",
    "trainer": "proxy.trainer",
}
"""Old module name under ``hf_gradfilter`` -> its new dotted path under ``hf_gradfilter``."""


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``hf_gradfilter.<old>`` and loads it as the already imported ``hf_gradfilter.<new>``."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != __package__ or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(f"{__package__}.{MOVED[spec.name.rpartition('.')[2]]}")
        spec.loader_state = module.__spec__  # importlib sets module.__spec__ to the alias's; exec_module undoes it
        return module

    def exec_module(self, module):
        # already executed under its new name: give it back its own spec (relative imports, reload)
        module.__spec__ = module.__spec__.loader_state


def install() -> None:
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.append(_Alias())
