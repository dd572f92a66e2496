"""The export formats and their file suffixes (torch-free, so the command line can list them cheaply)."""

SUFFIXES = {"onnx": ".onnx", "keras": ".keras", "torch": ".pt2"}
