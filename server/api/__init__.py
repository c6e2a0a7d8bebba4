"""The REST front: FastAPI, one router per resource, versioned under /v1."""
