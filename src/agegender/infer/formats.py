"""The export formats and their file suffixes (torch-free, so the command line can list them cheaply)."""

# The file suffix each format's output must have; a SavedModel is a directory, named without one.
SUFFIXES = {"onnx": ".onnx", "keras": ".keras", "torch": ".pt2", "savedmodel": ""}
