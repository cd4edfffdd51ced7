"""Client side: sending knocks and SPA packets."""
