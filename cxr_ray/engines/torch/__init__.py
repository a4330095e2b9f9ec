"""The PyTorch engine: ``runtime`` runs the artifact's network, ``build`` applies the precision rules."""
