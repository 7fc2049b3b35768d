"""The OpenAI-compatible gateway: app factory, per-API routes and handlers, engines, auth,
admission limits, metrics and conversation logging."""
