"""``sglp-edge run``: the run config schema, the resumable stages, the prune job and the per-device stages."""
