"""Conversation store: every served request, redacted, durably persisted off the request path."""
