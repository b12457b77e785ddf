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

# CUDA kernels against the reference (tests/test_kernels_cuda.py: nvcc compile, binding, GPU products) and
# their benchmark on the GPU; without a CUDA device the GPU tests and the benchmark skip with the reason.
gpu-check:
    {{py}} -m pytest -q -rs tests/test_kernels_cuda.py
    if {{py}} -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then {{py}} -m benchmarks.bench_kernels --device cuda; else echo "gpu-check: no CUDA device here, benchmark skipped"; fi

# Build the C++ kernels now and check every CPU code path against the reference.
doctor:
    {{moepack}} doctor
