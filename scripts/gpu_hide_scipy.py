"""Imported at start-up by every interpreter of scripts/gpu_check.sh's private venv (a .pth line).

Triton 2.51's Python-backend stub needs numpy < 2 (with numpy 2 its pybind11 reads the wrong
item size and every output tensor comes back empty), so that venv puts numpy 1.26 before the
GPU machine's own packages. That machine's SciPy and scikit-learn need numpy 2 and fail on
import; transformers treats both as optional and imports them only where
`importlib.util.find_spec` finds them, so here they are not found. Nothing served uses them.
"""

import importlib.util

_HIDDEN = {"scipy", "sklearn"}
_find_spec = importlib.util.find_spec


def _find_spec_hiding(name, package=None):
    if name.partition(".")[0] in _HIDDEN:
        return None
    return _find_spec(name, package)


importlib.util.find_spec = _find_spec_hiding
