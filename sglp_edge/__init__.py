"""sglp-edge: SGLP depth pruning, KD fine-tuning, export and edge benchmarking.

The Python API (see docs/bring-your-own-model.md)::

    plan = sglp_edge.analyze(model, calib, units="body.*", keep=4)
    pruned = sglp_edge.apply(model, plan)
    sglp_edge.save(pruned, "out/")
    model = sglp_edge.load("out/")

Keep this file free of heavy imports (torch, transformers, openvino...): the API functions are
imported on first use.
"""

__version__ = "0.1.0"

_API = ("analyze", "apply", "save", "load", "load_model")
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        from sglp_edge import api  # heavy: torch; `import sglp_edge` (and the CLI) stay light

        return getattr(api, name)
    raise AttributeError(f"module 'sglp_edge' has no attribute {name!r}")
