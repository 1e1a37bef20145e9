# The two quick-start commands (see README): each sets up the cached environment first.
.PHONY: demo test

demo:
	scripts/env.sh coalora-edge demo --force

test:
	scripts/env.sh python -m pytest -q
