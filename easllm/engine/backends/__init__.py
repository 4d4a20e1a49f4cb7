"""Engine backends; each is imported only when chosen (routes never import torch)."""
