"""What the sidecar tells operators: the admin endpoint, metrics and logs."""
