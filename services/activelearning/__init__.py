"""Active-learning service: uncertainty scores, batch selection, the feedback queue, export."""
