"""The pure DropBack core: no networking, no Flower, runs on a board or a notebook."""
