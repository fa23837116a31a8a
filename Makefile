# The two set-up commands of the README:
#   make demo   install everything, then run the whole pipeline on generated images
#               (embedded default: local folder store + SQLite under ./.moderation)
#   make test   install everything, start Postgres if needed, run the whole test suite
.PHONY: install demo test bench

install: .venv/.installed

.venv/.installed: pyproject.toml constraints.txt scripts/install.sh
	scripts/install.sh
	touch $@

demo: install
	.venv/bin/moderation demo

test: install
	scripts/ensure_services.sh
	.venv/bin/python -m pytest -q -p no:cacheprovider

bench: install
	.venv/bin/python benchmarks/pipeline_bench.py
