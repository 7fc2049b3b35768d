"""Admin routes for model versions: list, register, remove, activate, canary, rollback (admin
key)."""
