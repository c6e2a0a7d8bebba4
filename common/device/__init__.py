"""What trains: the DropBack optimizer, the streaming trainer, running top-k, the memory
footprint, the training loop, the data sets, and export to a dense model.

Builds on model/ and seed/; runs on a board (and in the server's evaluation).
"""
