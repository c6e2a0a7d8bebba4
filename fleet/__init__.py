"""Flower glue shared by the ClientApp and the ServerApp: run config and record layout."""
