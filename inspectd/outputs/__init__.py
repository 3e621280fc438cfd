"""Where inspections go: the ZeroMQ publisher and its wire format (later the archive and replay)."""
