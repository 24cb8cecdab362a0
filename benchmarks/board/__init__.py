"""The on-board harness: everything shipped to a board and nothing else (standard library, numpy and
the runtime; Python 3.8+). Nothing here imports outside ``benchmarks.board``."""
