"""anisota-agent."""
