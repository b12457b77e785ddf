# Recipes run inside the project's virtual environment (./dev.sh creates it).
set shell := ["bash", "-euo", "pipefail", "-c"]
venv := env_var_or_default("MOEPACK_VENV", ".venv")
py := venv + "/bin/python"
moepack := venv + "/bin/moepack"
example := "runs/example"

# Make a small Mixtral-style checkpoint, compress it, inspect it, run it.
demo:
    {{py}} -m moepack.testing.checkpoints mixtral {{example}}/checkpoint
    {{moepack}} compress {{example}}/checkpoint -o {{example}}/example.moepack --recipe q4g32 --force
    {{moepack}} inspect {{example}}/example.moepack
    {{moepack}} run {{example}}/example.moepack --prompt "To be, or not to be" --max-new-tokens 24 --vram 64MB --context 256 --stats

# The whole test suite (CPU; CUDA checks skip with a stated reason where no GPU is present).
test *ARGS:
    {{py}} -m pytest -q {{ARGS}}

lint:
    {{venv}}/bin/ruff check moepack tests benchmarks

# Benchmarks: numbers land in docs/benchmarks.md.
bench:
    {{py}} -m benchmarks.run_all

# Mutation fuzzer over whole packs: every mutant runs or is refused with a typed error (docs/reliability.md).
fuzz MUTANTS="2000" SEED="1":
    {{py}} tests/fuzz_packs.py --mutants {{MUTANTS}} --seed {{SEED}}

# Run first on a lent GPU: the CUDA kernels against the reference (tests/test_kernels_cuda.py), a budgeted
# streaming run on the device and the kernel benchmark. Without a CUDA device the GPU parts skip.
gpu-check:
    #!/usr/bin/env bash
    set -euo pipefail
    {{py}} -m pytest -q -rs tests/test_kernels_cuda.py
    if ! {{py}} -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
        echo "gpu-check: no CUDA device here; streaming run and benchmark skipped"; exit 0
    fi
    {{py}} -m moepack.testing.checkpoints mixtral runs/gpu-check/checkpoint
    {{moepack}} compress runs/gpu-check/checkpoint -o runs/gpu-check/p.moepack --recipe q4g32 --force
    {{moepack}} run runs/gpu-check/p.moepack --device cuda --vram 64MB --context 256 -n 32 --stats \
        --prompt "To be, or not to be"
    {{py}} -m benchmarks.bench_kernels --device cuda

# Build the C++ kernels now and check every CPU code path against the reference.
doctor:
    {{moepack}} doctor
