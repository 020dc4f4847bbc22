"""HTTP gateway: API keys and tenant scoping, OpenAI-compatible and admin routes over gRPC."""
