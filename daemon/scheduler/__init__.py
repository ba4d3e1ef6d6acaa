"""Who owns loaded models: loading, leases, keep_alive expiry, unloading."""
