"""Depth pruning to a device latency budget (``prune.keep: auto``): latency model, search, report."""
