"""The HTTP layer: FastAPI app, auth, error mapping, routes. JSON stays here and in protocol/."""
