"""The running proxy: the server, its workers, snapshots, drain and lifecycle."""
