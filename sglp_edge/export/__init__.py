"""PyTorch -> ONNX export: image models, sentence encoders, decoder LMs (plain, onnxruntime-genai, OpenVINO)."""
