"""Ray Data stages: the preprocessing callable and the pools, blocks and queues around it."""
