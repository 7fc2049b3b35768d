"""Admin routes for model versions: list, register, activate, canary, rollback (admin key)."""
