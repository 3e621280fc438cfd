"""Separate processes that carry the daemons' events elsewhere: a ZeroMQ proxy, MQTT, OPC UA."""
