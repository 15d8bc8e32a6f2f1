"""The hall day: 50 real agents, one broker, the ops monitor, faults, nothing lost (issue 14)."""
