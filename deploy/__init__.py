"""Deployment: the process fleet launcher, TLS material, container and edge-board kits."""
