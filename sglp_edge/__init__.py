"""sglp-edge: SGLP depth pruning, KD fine-tuning, export and edge benchmarking.

Keep this file free of heavy imports (torch, transformers, openvino...).
"""

__version__ = "0.1.0"
