"""The GPU group: process groups, Ulysses sequence parallelism, TPP, the follower ranks, weight sharding."""
