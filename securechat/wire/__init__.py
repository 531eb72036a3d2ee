"""What both ends speak: the sans-IO protocol, TLS settings, addresses, ids, option types, console output."""
