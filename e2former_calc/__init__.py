"""E2Former-V2 as an ASE calculator.

The public names are imported lazily, so that light modules (e.g. e2former_calc.water) load
without torch.
"""

_EXPORTS = {
    "E2FormerCalculator": "e2former_calc.calculator",
    "load_model": "e2former_calc.checkpoint",
    "save_model": "e2former_calc.checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'e2former_calc' has no attribute {name!r}")
