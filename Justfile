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
