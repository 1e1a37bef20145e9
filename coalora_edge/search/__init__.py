"""Stage 4, the search: per-(matrix, format) sensitivity, the allocation problem, knapsack,
budget ladder, decode speed, and the Pareto search (front, surrogate, rounds)."""
