"""The ONNX Runtime engine: ``runtime`` runs the graph, ``build`` exports and verifies it."""
