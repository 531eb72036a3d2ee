"""Where room lines live: the room-log seam, SQLite history, and the Redis back-end for several servers."""
