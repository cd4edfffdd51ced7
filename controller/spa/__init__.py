"""Single packet authorization: the verifier, the receiver on the spa_events ring, the replay cache."""
