"""The commands around the proxy: check, demo, diagnose, inspect, bench and pki."""
