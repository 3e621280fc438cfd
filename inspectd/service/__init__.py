"""The daemon as a service: configuration, lifecycle, reload plans, systemd notify, metrics."""
