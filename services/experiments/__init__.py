"""The experiments (A/B testing) service: definitions, assignment and results."""
