"""The TensorRT engine: ``runtime`` runs a verified plan, ``build`` builds one (``calibration`` for int8)."""
