"""The adapter service: what the HTTP layer calls for anything about adapters (see adapter_service)."""
