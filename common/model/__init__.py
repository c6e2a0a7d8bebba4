"""The model registry, each layer's seeded init, the flat layout, and a sparse model's state.

A sparse model is (seed, tracked positions, tracked values). Builds on seed/.
"""
