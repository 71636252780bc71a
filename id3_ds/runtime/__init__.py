"""What keeps a run alive or ends it cleanly, whatever it trains: the progress watchdog and fault injection."""
