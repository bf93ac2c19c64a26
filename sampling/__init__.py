"""Stage 2: expert and explored step records, and Monte-Carlo rollouts of them."""
