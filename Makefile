# The two quick-start commands (see README): each sets up the cached environment first.
.PHONY: demo test test-fast

demo:
	scripts/env.sh coalora-edge demo --force

# The whole suite: what CI runs (.ci/run).
test:
	scripts/env.sh python -m pytest -q

# The inner loop: everything not marked slow (a few minutes).
test-fast:
	scripts/env.sh python -m pytest -q -m "not slow"
