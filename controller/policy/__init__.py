"""From a validated config to the policy banks in the maps; time-based sequences."""
