"""Greedy decode speed of our decoder vs transformers `generate` on the default model (CPU, fp32, batch 1).

Both run the same prompt for the same number of new tokens in the same process,
interleaved (ours, HF, ours, HF, ...) so machine noise hits both alike; we
report medians and the ratio.

    python bench/cpu_generate.py [--new-tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, markdown_table, median, write_results  # noqa: E402
from fusionserve.models.decoder import Decoder  # noqa: E402
from fusionserve.models.generate import GenerateOptions, generate_ids  # noqa: E402
from fusionserve.models.registry import default_model_dir  # noqa: E402
from fusionserve.models.tokenizer import Tokenizer  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    model_dir = default_model_dir()
    tok = Tokenizer(model_dir)
    prompt = tok.encode(
        tok.apply_chat_template([{"role": "user", "content": PROMPT}]), add_special_tokens=False
    )
    ours = Decoder.from_pretrained(model_dir, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    n = args.new_tokens

    def run_ours(fusion: bool) -> float:
        t0 = time.perf_counter()
        out = list(generate_ids(ours, prompt, GenerateOptions(max_new_tokens=n, fusion=fusion)))
        assert len(out) == n
        return n / (time.perf_counter() - t0)

    def run_hf() -> float:
        ids = torch.tensor([prompt])
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2)
        assert out.shape[1] - len(prompt) == n
        return n / (time.perf_counter() - t0)

    run_ours(True), run_hf()  # warm-up: allocator, oneDNN primitives
    samples: dict[str, list[float]] = {"fusionserve (fused)": [], "fusionserve (off)": [], "transformers": []}
    for _ in tqdm(range(args.repeats), desc="repeats"):
        samples["fusionserve (fused)"].append(run_ours(True))
        samples["transformers"].append(run_hf())
        samples["fusionserve (off)"].append(run_ours(False))
    med = {k: median(v) for k, v in samples.items()}
    base = med["transformers"]
    rows = [[k, v, v / base] for k, v in med.items()]
    table = (
        f"CPU greedy decode, SmolLM2-135M-Instruct fp32, batch 1, prompt {len(prompt)} tokens, "
        f"{n} new tokens, median of {args.repeats} ({environment()['threads']} threads)\n\n"
        + markdown_table(["engine", "tokens/s", "vs transformers"], rows)
    )
    write_results("cpu_generate", {"env": environment(), "samples": samples, "median": med}, table)
    print(table)


if __name__ == "__main__":
    main()
