"""Training: recall channels, the ranker and the model bundle. Pure core (no Django)."""
