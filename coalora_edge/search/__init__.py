"""Configuration search: per-(matrix, format) sensitivity and the budget ladder."""
