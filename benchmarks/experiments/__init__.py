"""Host-side experiment scripts that print the tracked summary lines (tables in benchmarks/results/)."""
