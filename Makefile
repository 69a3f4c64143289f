# attnkit: the README's two commands.
#   make test    installs what is missing, then configures, builds and runs every test
#   make bench   Release build (-O3 -march=native), runs the benchmarks, writes JSON and PNG plots
# Other targets: test-native (the tests built with -march=native, so the AVX2 / AVX-512 code paths run too),
# test-asan (tests under AddressSanitizer + UBSan, scalar variants aside), test-tsan (the thread-safety tests under
# ThreadSanitizer), fuzz (libFuzzer run of the kernels against the reference, FUZZ_SECONDS=60), bench-quick (smoke
# run), bench-compare BASE=... NEW=... (per-benchmark time ratios of two runs), bench-readme (publish a full run in the
# README and docs/benchmarks), clean.

PACKAGES := cmake g++ make libeigen3-dev libgtest-dev libgmock-dev libbenchmark-dev python3-matplotlib
FUZZ_PACKAGES := clang libclang-rt-14-dev
FUZZ_SECONDS ?= 60
PYTHON ?= /usr/bin/python3
RESULTS := build/bench-results
BENCH_BINARIES := bench_sdpa bench_multi_head bench_sparse bench_linear bench_synthesizer bench_gau
BENCH_FILTER ?= .
BENCH_MIN_TIME ?= 0.2

.PHONY: test test-native test-asan test-tsan fuzz bench bench-quick bench-compare bench-readme deps clean

deps:
	@missing=""; \
	for p in $(or $(NEEDED),$(PACKAGES)); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; \
	  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo"; \
	  else echo "attnkit needs:$$missing"; echo "Run: sudo apt-get install -y$$missing"; exit 1; fi; \
	  echo "Installing:$$missing"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq$$missing; \
	fi

test: deps
	cmake --preset default
	cmake --build --preset default
	ctest --preset default

test-native: deps
	cmake --preset native
	cmake --build --preset native
	ctest --preset native

test-asan: deps
	cmake --preset asan
	cmake --build --preset asan
	ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 ctest --preset asan

test-tsan: deps
	cmake --preset tsan
	cmake --build --preset tsan
	TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 ctest --preset tsan

# The libFuzzer target (clang, ASan + UBSan, Eigen's assertions on) for FUZZ_SECONDS on the committed seed corpus;
# new inputs go to build/fuzz/corpus, a finding to build/fuzz/crash-* (and a non-zero exit).
fuzz:
	@$(MAKE) --no-print-directory deps NEEDED="$(PACKAGES) $(FUZZ_PACKAGES)"
	cmake --preset fuzz
	cmake --build --preset fuzz
	@mkdir -p build/fuzz/corpus
	./build/fuzz/fuzz/fuzz_attention build/fuzz/corpus fuzz/corpus -max_total_time=$(FUZZ_SECONDS) -max_len=2048 \
	  -artifact_prefix=build/fuzz/ -print_final_stats=1

bench: deps
	cmake --preset release
	cmake --build --preset release
	@mkdir -p $(RESULTS)
	@start=$$(date +%s); i=0; total=$(words $(BENCH_BINARIES)); \
	for b in $(BENCH_BINARIES); do \
	  i=$$((i + 1)); \
	  echo "== [$$i/$$total] $$b, $$(( $$(date +%s) - start )) s elapsed"; \
	  ./build/release/bench/$$b --benchmark_filter='$(BENCH_FILTER)' --benchmark_min_time=$(BENCH_MIN_TIME) \
	    --benchmark_out=$(RESULTS)/$$b.json --benchmark_out_format=json || exit 1; \
	done; \
	echo "== all $$total benchmark binaries done in $$(( $$(date +%s) - start )) s"
	$(PYTHON) bench/plot.py $(RESULTS)

bench-quick:
	$(MAKE) bench BENCH_FILTER='(n:(256|512)|m:4096|pattern:[0-9]+/n:1024|BM_Dense/n:1024|length:1024|BM_StreamFloor/work:16/panel:16|n:4096/page_KiB:[0-9]+)/' BENCH_MIN_TIME=0.01

# After a full `make bench`: copy its summary, overview and plots to docs/benchmarks/ and put the overview table
# into the README's benchmark section.
bench-readme:
	$(PYTHON) bench/update_readme.py $(RESULTS)

# Per-benchmark time ratios of two runs (JSON files or result directories), e.g. a copy of build/bench-results made
# before a change against the one after it.
bench-compare:
	@if [ -z "$(BASE)" ] || [ -z "$(NEW)" ]; then echo "usage: make bench-compare BASE=<json or dir> NEW=<json or dir>"; exit 2; fi
	$(PYTHON) bench/compare.py $(BASE) $(NEW)

clean:
	rm -rf build
