"""Control plane: announcements -> fetch -> verify -> load -> warm up -> swap, apart from the hot path."""
