"""edge-fleet: operator tools (keys and signing, rollouts, fleet status)."""
