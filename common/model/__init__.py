"""Each model's layers, the registry, each layer's seeded init, the flat layout, and a sparse model's state.

A sparse model is (seed, tracked positions, tracked values). Builds on seed/.
Only `torch_model.py` imports torch: everything else here runs without it.
"""
