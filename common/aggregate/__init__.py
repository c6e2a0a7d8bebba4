"""What the server computes: the sparse merge, the server optimizers, the update memory.

Builds on model/ and seed/.
"""
