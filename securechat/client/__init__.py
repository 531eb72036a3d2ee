"""The chat client: the connection, its two front ends, pins and profiles, and joining with an invite."""
