"""Hugging Face reference outputs for torchwire's parity tests.

    python scripts/hf_reference.py --model models/torchwire-tiny \
        [--max-new-tokens 16] --prompt "The meaning of life is" [--prompt ...]

Prints one JSON object to stdout:

    {"cases": [{"prompt": str,
                "input_ids": [int],          # tokenizer(prompt, add_special_tokens=True)
                "logits": [[float, ...]],    # one full-vocab row per input position
                "greedy_ids": [int]}]}       # exactly N new tokens, greedy

Everything runs in float32 on CPU with the eager attention implementation, so
the numbers are what a plain, unfused Llama forward pass computes.
"""

import argparse
import json
import sys

import torch
from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM


def main():
    p = argparse.ArgumentParser(description="Hugging Face reference logits and greedy continuations")
    p.add_argument("--model", required=True, help="model directory (Hugging Face layout)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    args = p.parse_args()

    torch.set_grad_enabled(False)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # (`dtype` is what transformers 5 calls the former `torch_dtype` argument)
    model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager")
    model.to("cpu").eval()

    # An explicit config, so nothing from the model's generation_config.json
    # (or library defaults) adds logits processors: greedy, no repetition
    # penalty, and eos_token_id=None so that generation does not stop at EOS
    # and always yields exactly N tokens. It also replaces the model's own
    # generation config, whose eos_token_id generate() would otherwise merge in.
    n = args.max_new_tokens
    gen_config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=n,
        eos_token_id=None,
        pad_token_id=tokenizer.eos_token_id,  # unused for a single sequence
        bos_token_id=tokenizer.bos_token_id,
        repetition_penalty=1.0,
        use_cache=True,
    )
    model.generation_config = gen_config

    cases = []
    for prompt in args.prompt:
        input_ids = tokenizer(prompt, add_special_tokens=True).input_ids
        ids = torch.tensor([input_ids])
        mask = torch.ones_like(ids)

        # one forward pass over the whole prompt: logits for every position
        logits = model(input_ids=ids, attention_mask=mask).logits[0]

        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config)
        greedy_ids = out[0, len(input_ids) :].tolist()
        assert len(greedy_ids) == n, (len(greedy_ids), n)

        cases.append(
            {
                "prompt": prompt,
                "input_ids": input_ids,
                "logits": logits.tolist(),
                "greedy_ids": greedy_ids,
            }
        )

    json.dump({"cases": cases}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
