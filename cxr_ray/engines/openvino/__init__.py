"""The OpenVINO engine (CPU plugin): ``runtime`` runs the artifact's ONNX graph, ``build`` provisions and verifies it."""
