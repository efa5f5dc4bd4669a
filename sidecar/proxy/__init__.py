"""The data plane: listeners, inbound and outbound connection handling, the byte pump."""
